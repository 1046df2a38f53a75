//! File I/O for every crate of formers, with the rules a hostile or careless path must not
//! break: inputs are regular files read up to a size limit (a FIFO, a device or a directory
//! is refused before it is read), and files formers creates never follow a symbolic link
//! and never replace an existing file unless the caller asks.
//!
//! Every error is an [`Error::Io`] naming the path.

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};

use crate::{Error, Result};

/// Size limit of small JSON and TOML inputs: formers configs, Hugging Face `config.json`,
/// `run.json`, `state.json`, request files.
pub const MAX_CONFIG_BYTES: u64 = 16 << 20;
/// Size limit of a `tokenizer.json` (the largest public ones are a few tens of MiB).
pub const MAX_TOKENIZER_BYTES: u64 = 512 << 20;
/// Size limit of one line of a JSON-lines file (`metrics.jsonl`, `results.jsonl`).
pub const MAX_LINE_BYTES: u64 = 64 << 20;

fn io_err(path: &Path, kind: io::ErrorKind, msg: impl Into<String>) -> Error {
    Error::io(path, io::Error::new(kind, msg.into()))
}

/// The error for a path that is not a regular file, saying what it is.
fn not_regular(path: &Path, meta: &fs::Metadata) -> Error {
    let msg = format!("is {}, expected a file", kind_of(meta));
    io_err(path, io::ErrorKind::InvalidInput, msg)
}

/// What a path is, in words, when it is not a regular file.
fn kind_of(meta: &fs::Metadata) -> &'static str {
    let t = meta.file_type();
    if t.is_dir() {
        return "a directory";
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt;
        if t.is_fifo() {
            return "a FIFO";
        }
        if t.is_char_device() || t.is_block_device() {
            return "a device";
        }
        if t.is_socket() {
            return "a socket";
        }
    }
    "something other than a file"
}

/// Opens `path` for reading, refusing anything but a regular file (symbolic links to one
/// are followed: inputs often live in caches made of links). Opening does not block on a
/// FIFO.
pub fn open_regular(path: &Path) -> Result<File> {
    let mut opts = OpenOptions::new();
    opts.read(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.custom_flags(libc::O_NONBLOCK);
    }
    let file = opts.open(path).map_err(|e| Error::io(path, e))?;
    let meta = file.metadata().map_err(|e| Error::io(path, e))?;
    if !meta.is_file() {
        return Err(not_regular(path, &meta));
    }
    Ok(file)
}

/// The bytes of regular file `path`, refused when larger than `max` bytes; `what` names the
/// input in that error (`"a run record"`).
pub fn read_limited(path: &Path, max: u64, what: &str) -> Result<Vec<u8>> {
    let file = open_regular(path)?;
    let too_big = || {
        io_err(
            path,
            io::ErrorKind::InvalidData,
            format!("larger than the {} limit for {what}", human_bytes(max)),
        )
    };
    let len = file.metadata().map_err(|e| Error::io(path, e))?.len();
    if len > max {
        return Err(too_big());
    }
    let mut bytes = Vec::with_capacity(len as usize);
    file.take(max + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| Error::io(path, e))?;
    if bytes.len() as u64 > max {
        return Err(too_big());
    }
    Ok(bytes)
}

/// Like [`read_limited`], as UTF-8 text.
pub fn read_text_limited(path: &Path, max: u64, what: &str) -> Result<String> {
    String::from_utf8(read_limited(path, max, what)?)
        .map_err(|_| io_err(path, io::ErrorKind::InvalidData, "not UTF-8 text"))
}

/// One line of a text file read by [`lines`].
#[derive(Debug, Clone, PartialEq)]
pub struct Line {
    /// 1-based line number.
    pub number: usize,
    /// The line without its newline.
    pub text: String,
    /// Whether the line ended with a newline (only the last line of a file may not: a
    /// write cut short by a kill).
    pub complete: bool,
}

/// The lines of regular file `path`, streamed; a line longer than `max_line` bytes or not
/// UTF-8 is an error naming the file and line.
pub fn lines(path: &Path, max_line: u64) -> Result<impl Iterator<Item = Result<Line>>> {
    let mut reader = BufReader::new(open_regular(path)?);
    let path = path.to_path_buf();
    let mut number = 0;
    let mut done = false;
    Ok(std::iter::from_fn(move || {
        if done {
            return None;
        }
        number += 1;
        let mut buf = Vec::new();
        let read = (&mut reader).take(max_line + 1).read_until(b'\n', &mut buf);
        let at = |msg: String| io_err(&path, io::ErrorKind::InvalidData, msg);
        let item = match read {
            Err(e) => Err(Error::io(&path, e)),
            Ok(0) => {
                done = true;
                return None;
            }
            Ok(_) => {
                let complete = buf.last() == Some(&b'\n');
                if complete {
                    buf.pop();
                }
                if buf.len() as u64 > max_line {
                    Err(at(format!(
                        "line {number} is longer than the {} limit",
                        human_bytes(max_line)
                    )))
                } else {
                    String::from_utf8(buf)
                        .map(|text| Line {
                            number,
                            text,
                            complete,
                        })
                        .map_err(|_| at(format!("line {number} is not UTF-8")))
                }
            }
        };
        done |= item.is_err();
        Some(item)
    }))
}

/// Options for files formers creates: never through a symbolic link.
fn nofollow(opts: &mut OpenOptions) -> &mut OpenOptions {
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.custom_flags(libc::O_NOFOLLOW);
    }
    opts
}

/// Creates `path` for writing; it must not exist (not even as a dangling symbolic link).
pub fn create_new(path: &Path) -> Result<File> {
    nofollow(OpenOptions::new().write(true).create_new(true))
        .open(path)
        .map_err(|e| match e.kind() {
            io::ErrorKind::AlreadyExists => already_exists(path),
            _ => Error::io(path, e),
        })
}

/// Opens `path` for appending, creating it if absent; a symbolic link or anything but a
/// regular file is refused.
pub fn append_nofollow(path: &Path) -> Result<File> {
    let file = nofollow(OpenOptions::new().append(true).create(true))
        .open(path)
        .map_err(|e| Error::io(path, e))?;
    let meta = file.metadata().map_err(|e| Error::io(path, e))?;
    if !meta.is_file() {
        return Err(not_regular(path, &meta));
    }
    // Portable fallback where O_NOFOLLOW does not exist: the link itself is checked.
    refuse_symlink(path)?;
    Ok(file)
}

/// The error for an output that exists and may not be replaced.
fn already_exists(path: &Path) -> Error {
    io_err(
        path,
        io::ErrorKind::AlreadyExists,
        "already exists; pass --force to replace it",
    )
}

fn refuse_symlink(path: &Path) -> Result<()> {
    match fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_symlink() => Err(io_err(
            path,
            io::ErrorKind::InvalidInput,
            "is a symbolic link; formers does not write through links",
        )),
        _ => Ok(()),
    }
}

/// Whether something (a file, a directory, a link, even a dangling one) is at `path`.
pub fn exists(path: &Path) -> bool {
    fs::symlink_metadata(path).is_ok()
}

/// Refuses an existing `path` (naming `--force`) unless `overwrite`.
pub fn refuse_existing(path: &Path, overwrite: bool) -> Result<()> {
    if !overwrite && exists(path) {
        return Err(already_exists(path));
    }
    Ok(())
}

/// Writes `bytes` to `path` as one step: a new temporary file in the same directory,
/// synced, then renamed over `path`. A symbolic link at `path` is replaced, never followed;
/// an existing `path` is refused unless `overwrite`. On error no temporary file is left.
pub fn write_atomic(path: &Path, bytes: &[u8], overwrite: bool) -> Result<()> {
    refuse_existing(path, overwrite)?;
    if let Some(meta) = fs::symlink_metadata(path).ok().filter(|m| m.is_dir()) {
        return Err(not_regular(path, &meta));
    }
    let tmp = temp_path(path);
    let written = create_new(&tmp).and_then(|mut f| {
        f.write_all(bytes)
            .and_then(|()| f.sync_all())
            .map_err(|e| Error::io(&tmp, e))
    });
    let renamed = written.and_then(|()| fs::rename(&tmp, path).map_err(|e| Error::io(path, e)));
    if renamed.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    renamed
}

/// Creates directory `out` (which must not exist yet, or be empty) with the files `fill`
/// writes into the directory it is given: a sibling `.NAME.partial` directory, renamed to
/// `out` once `fill` succeeds, so a failure leaves no half-written directory.
pub fn write_dir_atomic(out: &Path, fill: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    if out.exists()
        && fs::read_dir(out)
            .map_err(|e| Error::io(out, e))?
            .next()
            .is_some()
    {
        return Err(Error::Input(format!(
            "{} exists and is not empty; choose a new output directory",
            out.display()
        )));
    }
    let name = out
        .file_name()
        .ok_or_else(|| Error::Input(format!("{}: not a directory name", out.display())))?;
    let tmp = out.with_file_name(format!(".{}.partial", name.to_string_lossy()));
    if tmp.exists() {
        fs::remove_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    }
    fs::create_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    if let Err(e) = fill(&tmp) {
        let _ = fs::remove_dir_all(&tmp);
        return Err(e);
    }
    if out.exists() {
        fs::remove_dir(out).map_err(|e| Error::io(out, e))?;
    }
    fs::rename(&tmp, out).map_err(|e| Error::io(out, e))
}

/// `.NAME.tmp-PID` beside `path`.
fn temp_path(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map_or_else(|| "out".into(), |n| n.to_string_lossy().into_owned());
    path.with_file_name(format!(".{name}.tmp-{}", std::process::id()))
}

/// `16 MiB`, `512 KiB`, `100 bytes`.
pub fn human_bytes(n: u64) -> String {
    match n {
        n if n >= 1 << 30 && n % (1 << 30) == 0 => format!("{} GiB", n >> 30),
        n if n >= 1 << 20 && n % (1 << 20) == 0 => format!("{} MiB", n >> 20),
        n if n >= 1 << 10 && n % (1 << 10) == 0 => format!("{} KiB", n >> 10),
        n => format!("{n} bytes"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmpdir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("formers-fsio-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn inputs_must_be_regular_files_within_the_limit() {
        let d = tmpdir("read");
        let f = d.join("a.json");
        fs::write(&f, "12345").unwrap();
        assert_eq!(read_limited(&f, 5, "x").unwrap(), b"12345");
        let e = read_limited(&f, 4, "a config").unwrap_err().to_string();
        assert!(
            e.contains("a.json") && e.contains("4 bytes limit for a config"),
            "{e}"
        );
        let e = read_limited(&d, 4, "a config").unwrap_err().to_string();
        assert!(e.contains("is a directory"), "{e}");
        #[cfg(unix)]
        {
            // A device is refused at once instead of read to the limit (or forever).
            let e = read_limited(Path::new("/dev/zero"), 1 << 40, "x")
                .unwrap_err()
                .to_string();
            assert!(e.contains("/dev/zero: is a device"), "{e}");
            let fifo = d.join("fifo");
            let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
            assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
            let e = read_limited(&fifo, 10, "x").unwrap_err().to_string();
            assert!(e.contains("is a FIFO"), "{e}");
        }
        let e = read_limited(&d.join("missing"), 4, "x")
            .unwrap_err()
            .to_string();
        assert_eq!(e.matches("os error 2").count(), 1, "{e}");
        let _ = fs::remove_dir_all(&d);
    }

    #[test]
    fn lines_are_streamed_with_a_limit_and_mark_a_cut_last_line() {
        let d = tmpdir("lines");
        let f = d.join("m.jsonl");
        fs::write(&f, "a\nbb\nccc").unwrap();
        let got: Vec<Line> = lines(&f, 3).unwrap().map(|l| l.unwrap()).collect();
        assert_eq!(got.len(), 3);
        assert!(got[1].complete && got[1].text == "bb" && got[1].number == 2);
        assert!(!got[2].complete && got[2].text == "ccc");
        let e = lines(&f, 2)
            .unwrap()
            .map(|l| l.map(|_| ()))
            .collect::<Result<Vec<_>>>();
        assert!(e.unwrap_err().to_string().contains("line 3 is longer"));
        let _ = fs::remove_dir_all(&d);
    }

    #[cfg(unix)]
    #[test]
    fn created_files_never_follow_links_nor_replace_without_asking() {
        let d = tmpdir("write");
        let victim = d.join("victim");
        fs::write(&victim, "keep").unwrap();
        let link = d.join("out");
        std::os::unix::fs::symlink(&victim, &link).unwrap();
        let e = create_new(&link).unwrap_err().to_string();
        assert!(e.contains("already exists"), "{e}");
        assert!(append_nofollow(&link).is_err());
        let e = write_atomic(&link, b"new", false).unwrap_err().to_string();
        assert!(e.contains("--force"), "{e}");
        write_atomic(&link, b"new", true).unwrap();
        assert_eq!(fs::read_to_string(&victim).unwrap(), "keep");
        assert_eq!(fs::read_to_string(&link).unwrap(), "new");
        assert!(!fs::symlink_metadata(&link)
            .unwrap()
            .file_type()
            .is_symlink());
        // A failed write leaves no temporary file behind.
        assert!(write_atomic(&d.join("no/such/dir/x"), b"x", true).is_err());
        assert!(write_atomic(&d, b"x", true).is_err());
        let names: Vec<_> = fs::read_dir(&d)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 2, "{names:?}");
        let _ = fs::remove_dir_all(&d);
    }
}

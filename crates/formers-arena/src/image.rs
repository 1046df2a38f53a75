//! CIFAR-10 (Krizhevsky 2009, "Learning Multiple Layers of Features from Tiny Images") as
//! grayscale pixel sequences: the "Image" task of Long Range Arena (Tay et al., ICLR 2021).
//!
//! Follows LRA's `lra_benchmarks/image/input_pipeline.py` (`get_cifar10_datasets`):
//!
//! * train = the first 90% of the 50,000 training images (`train[:90%]`, 45,000), val = the
//!   last 10% (`train[90%:]`, 5,000), test = the 10,000 test images;
//! * pixels are `tf.cast(tf.image.rgb_to_grayscale(image), tf.int32)`: the uint8 channels are
//!   scaled to `[0, 1]` (`x / 255`), weighted `0.2989 R + 0.5870 G + 0.1140 B` in float32, and
//!   converted back to uint8 by `convert_image_dtype`, i.e. multiplied by 255.5 and truncated;
//!   ids are those values (vocab 256), the sequence is the image row-major (1,024 tokens).
//!
//! `Lite` averages 2×2 blocks of the grayscale image (rounding halves up) to 16×16 = 256
//! tokens; train = the first 5,000 training images, val = the last 500 training images,
//! test = the first 1,000 test images. Split sizes are capped by the records available
//! (train is filled first; val never overlaps it).
//!
//! Reads the CIFAR-10 binary version: `data_batch_1.bin` … `data_batch_5.bin` and
//! `test_batch.bin`, records of 3,073 bytes (label, then 1,024 R, 1,024 G, 1,024 B bytes,
//! each plane row-major 32×32). Only the selected images are kept, as token bytes.
//!
//! LRA has no TSV for images; `write_tsv` writes a header `Target\tPixels`, then per image
//! `label\tp0 p1 ... pN` (the label, a tab, the pixel ids separated by spaces).

use std::fs;
use std::io::{self, Write};
use std::ops::Range;
use std::path::{Path, PathBuf};

use crate::task::{ArenaTask, Example, Setting, Split};

/// Bytes per record of the binary version: label + 3 × 1,024 channel bytes.
pub const RECORD_BYTES: usize = 1 + 3 * PIXELS;
/// The training batch files, in order.
pub const TRAIN_FILES: [&str; 5] = [
    "data_batch_1.bin",
    "data_batch_2.bin",
    "data_batch_3.bin",
    "data_batch_4.bin",
    "data_batch_5.bin",
];
/// The test batch file.
pub const TEST_FILE: &str = "test_batch.bin";
/// The sub-directory the official archive unpacks to.
pub const ARCHIVE_DIR: &str = "cifar-10-batches-bin";
/// Where to get the binary version.
pub const DOWNLOAD_URL: &str = "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz";

const SIDE: usize = 32;
const PIXELS: usize = SIDE * SIDE;
/// Lite split caps: train, val, test.
const LITE_CAPS: [usize; 3] = [5_000, 500, 1_000];

/// LRA's grayscale of one pixel (`tf.image.rgb_to_grayscale` on uint8, in float32).
pub fn grayscale(r: u8, g: u8, b: u8) -> u8 {
    let to_unit = 1.0f32 / 255.0;
    let luma = (r as f32 * to_unit) * 0.2989f32
        + (g as f32 * to_unit) * 0.5870f32
        + (b as f32 * to_unit) * 0.1140f32;
    (luma * 255.5f32) as u8 // truncating, as `convert_image_dtype` casts
}

/// The grayscale image (row-major `SIDE × SIDE`) of one record's 3,072 channel bytes.
fn grayscale_image(planes: &[u8]) -> Vec<u8> {
    let (red, rest) = planes.split_at(PIXELS);
    let (green, blue) = rest.split_at(PIXELS);
    (0..PIXELS)
        .map(|p| grayscale(red[p], green[p], blue[p]))
        .collect()
}

/// Averages 2×2 blocks of a row-major `side × side` image (rounding halves up), giving a
/// `side/2 × side/2` image.
pub fn downsample_2x2(image: &[u8], side: usize) -> Vec<u8> {
    let half = side / 2;
    let mut out = Vec::with_capacity(half * half);
    for row in 0..half {
        for col in 0..half {
            let at = |r: usize, c: usize| image[r * side + c] as u32;
            let (r, c) = (2 * row, 2 * col);
            let sum = at(r, c) + at(r, c + 1) + at(r + 1, c) + at(r + 1, c + 1);
            out.push(((sum + 2) / 4) as u8);
        }
    }
    out
}

/// The images of one split: `labels.len()` images of `tokens` bytes each.
#[derive(Debug, Default)]
struct SplitImages {
    pixels: Vec<u8>,
    labels: Vec<u8>,
}

/// CIFAR-10 as LRA's Image task.
#[derive(Debug)]
pub struct Cifar10 {
    dir: PathBuf,
    tokens: usize,
    available: [usize; 2],
    splits: [SplitImages; 3],
}

fn split_slot(split: Split) -> usize {
    match split {
        Split::Train => 0,
        Split::Val => 1,
        Split::Test => 2,
    }
}

impl Cifar10 {
    /// Reads the CIFAR-10 binary version from `dir` or from `dir/cifar-10-batches-bin/`.
    /// Needs `test_batch.bin` and at least one `data_batch_K.bin`; the error says which files
    /// were looked for, where, and where to download them.
    pub fn open(dir: &Path, setting: Setting) -> Result<Cifar10, String> {
        Cifar10::open_with_caps(dir, setting, LITE_CAPS)
    }

    fn open_with_caps(dir: &Path, setting: Setting, caps: [usize; 3]) -> Result<Cifar10, String> {
        let dir = find_batch_dir(dir)?;
        let train_files: Vec<PathBuf> = TRAIN_FILES
            .iter()
            .map(|name| dir.join(name))
            .filter(|path| path.is_file())
            .collect();
        let train_counts = train_files
            .iter()
            .map(|path| record_count(path))
            .collect::<Result<Vec<_>, _>>()?;
        let test_path = dir.join(TEST_FILE);
        let n_train: usize = train_counts.iter().sum();
        let n_test = record_count(&test_path)?;
        let [train, val, test] = plan(setting, n_train, n_test, caps);
        let lite = setting == Setting::Lite;

        let mut splits: [SplitImages; 3] = Default::default();
        let mut first = 0;
        for (path, count) in train_files.iter().zip(&train_counts) {
            let global = first..first + count;
            first += count;
            let [train_split, val_split, _] = &mut splits;
            let wanted = [(&train, train_split), (&val, val_split)];
            load_records(path, global, wanted, lite)?;
        }
        let [_, _, test_split] = &mut splits;
        load_records(&test_path, 0..n_test, [(&test, test_split)], lite)?;

        Ok(Cifar10 {
            dir,
            tokens: if lite { PIXELS / 4 } else { PIXELS },
            available: [n_train, n_test],
            splits,
        })
    }
}

/// The directory holding the batch files: `dir` itself or `dir/cifar-10-batches-bin`.
fn find_batch_dir(dir: &Path) -> Result<PathBuf, String> {
    let candidates = [dir.to_path_buf(), dir.join(ARCHIVE_DIR)];
    for candidate in &candidates {
        let has_test = candidate.join(TEST_FILE).is_file();
        let has_train = TRAIN_FILES.iter().any(|f| candidate.join(f).is_file());
        if has_test && has_train {
            return Ok(candidate.clone());
        }
    }
    Err(format!(
        "CIFAR-10 binary version not found: looked for {} … {} and {} in {} and in {}; \
         download {} and unpack it in {} (it creates {}/)",
        TRAIN_FILES[0],
        TRAIN_FILES[4],
        TEST_FILE,
        candidates[0].display(),
        candidates[1].display(),
        DOWNLOAD_URL,
        dir.display(),
        ARCHIVE_DIR
    ))
}

/// Number of records in a batch file, checking its size.
fn record_count(path: &Path) -> Result<usize, String> {
    let size = fs::metadata(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?
        .len() as usize;
    if !size.is_multiple_of(RECORD_BYTES) {
        return Err(format!(
            "{}: size {size} bytes is not a whole number of {RECORD_BYTES}-byte records \
             (is it the CIFAR-10 binary version?)",
            path.display()
        ));
    }
    Ok(size / RECORD_BYTES)
}

/// Index ranges of train and val (into the training images) and test (into the test images).
fn plan(setting: Setting, n_train: usize, n_test: usize, caps: [usize; 3]) -> [Range<usize>; 3] {
    match setting {
        Setting::Full => {
            let train_end = n_train * 9 / 10;
            [0..train_end, train_end..n_train, 0..n_test]
        }
        Setting::Lite => {
            let train_end = caps[0].min(n_train);
            let val_len = caps[1].min(n_train - train_end);
            [
                0..train_end,
                n_train - val_len..n_train,
                0..caps[2].min(n_test),
            ]
        }
    }
}

/// Reads the records of `path` (global indices `global`) that fall in the wanted ranges
/// and appends their tokens to the matching splits; skips the file if none is wanted.
fn load_records<const N: usize>(
    path: &Path,
    global: Range<usize>,
    mut wanted: [(&Range<usize>, &mut SplitImages); N],
    lite: bool,
) -> Result<(), String> {
    let overlaps = |r: &Range<usize>| r.start < global.end && global.start < r.end;
    if !wanted.iter().any(|(range, _)| overlaps(range)) {
        return Ok(());
    }
    let bytes = fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    for (local, record) in bytes.chunks_exact(RECORD_BYTES).enumerate() {
        let index = global.start + local;
        for (range, images) in wanted.iter_mut() {
            if range.contains(&index) {
                push_record(record, lite, images)
                    .map_err(|e| format!("{} record {}: {e}", path.display(), local + 1))?;
            }
        }
    }
    Ok(())
}

fn push_record(record: &[u8], lite: bool, images: &mut SplitImages) -> Result<(), String> {
    let label = record[0];
    if label >= 10 {
        return Err(format!("label {label} is not 0-9"));
    }
    let gray = grayscale_image(&record[1..]);
    let tokens = if lite {
        downsample_2x2(&gray, SIDE)
    } else {
        gray
    };
    images.pixels.extend_from_slice(&tokens);
    images.labels.push(label);
    Ok(())
}

impl ArenaTask for Cifar10 {
    fn name(&self) -> &'static str {
        "image"
    }

    fn source(&self) -> String {
        format!(
            "CIFAR-10 binary in {} ({} training + {} test images)",
            self.dir.display(),
            self.available[0],
            self.available[1]
        )
    }

    fn n_classes(&self) -> usize {
        10
    }

    fn vocab_size(&self) -> usize {
        256
    }

    fn max_len(&self) -> usize {
        self.tokens
    }

    fn grid_width(&self) -> Option<usize> {
        Some(self.tokens.isqrt())
    }

    fn len(&self, split: Split) -> usize {
        self.splits[split_slot(split)].labels.len()
    }

    fn example(&self, split: Split, index: usize) -> Example {
        let images = &self.splits[split_slot(split)];
        let pixels = &images.pixels[index * self.tokens..(index + 1) * self.tokens];
        Example::new(
            pixels.iter().map(|&p| p as u32).collect(),
            images.labels[index] as u32,
        )
    }

    /// Header `Target\tPixels`, then `label\tp0 p1 ... pN` per image (LRA has no image TSV).
    fn write_tsv(&self, split: Split, n: usize, out: &mut dyn Write) -> io::Result<()> {
        writeln!(out, "Target\tPixels")?;
        for index in 0..n.min(self.len(split)) {
            let example = self.example(split, index);
            let pixels: Vec<String> = example.ids.iter().map(|p| p.to_string()).collect();
            writeln!(out, "{}\t{}", example.label, pixels.join(" "))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A record whose three channels equal `level(p)` at every pixel `p` (so its grayscale
    /// is `level(p)` too) — or distinct channels when `colour` is set.
    fn record(label: u8, seed: usize, colour: bool) -> Vec<u8> {
        let mut bytes = vec![label];
        for channel in 0..3 {
            for p in 0..PIXELS {
                let shift = if colour { channel * 85 } else { 0 };
                bytes.push(((p * 7 + seed * 13 + shift) % 256) as u8);
            }
        }
        bytes
    }

    fn write_batch(path: &Path, records: &[(u8, usize)], colour: bool) {
        let bytes: Vec<u8> = records
            .iter()
            .flat_map(|&(label, seed)| record(label, seed, colour))
            .collect();
        fs::write(path, bytes).unwrap();
    }

    /// parent/cifar-10-batches-bin/ with 4 + 3 training and 3 test records; record `i` of the
    /// training set has label `i` and seed `i`, test record `j` label `9 - j`, seed `100 + j`.
    fn fake_cifar(name: &str, colour: bool) -> PathBuf {
        let parent = std::env::temp_dir().join(format!("cifar-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&parent);
        let dir = parent.join(ARCHIVE_DIR);
        fs::create_dir_all(&dir).unwrap();
        let train: Vec<(u8, usize)> = (0..7).map(|i| (i as u8, i)).collect();
        write_batch(&dir.join(TRAIN_FILES[0]), &train[..4], colour);
        write_batch(&dir.join(TRAIN_FILES[1]), &train[4..], colour);
        let test: Vec<(u8, usize)> = (0..3).map(|j| (9 - j as u8, 100 + j)).collect();
        write_batch(&dir.join(TEST_FILE), &test, colour);
        parent
    }

    fn level(seed: usize, p: usize) -> u32 {
        ((p * 7 + seed * 13) % 256) as u32
    }

    #[test]
    fn grayscale_matches_lra_weights_and_truncation() {
        assert_eq!(grayscale(0, 0, 0), 0);
        assert_eq!(grayscale(255, 255, 255), 255);
        assert_eq!(grayscale(255, 0, 0), 76); // 0.2989 * 255.5 = 76.37
        assert_eq!(grayscale(0, 255, 0), 149); // 0.5870 * 255.5 = 149.98
        assert_eq!(grayscale(0, 0, 255), 29); // 0.1140 * 255.5 = 29.13
        for v in 0..=255u8 {
            assert_eq!(grayscale(v, v, v), v, "grey level {v} is kept");
        }
    }

    #[test]
    fn downsampling_averages_blocks() {
        let image = [0, 2, 10, 10, 1, 1, 10, 11, 255, 255, 7, 8, 255, 254, 9, 9];
        assert_eq!(downsample_2x2(&image, 4), vec![1, 10, 255, 8]);
    }

    #[test]
    fn full_setting_reads_labels_pixels_and_splits() {
        let parent = fake_cifar("full", false);
        let task = Cifar10::open(&parent, Setting::Full).unwrap();
        assert_eq!(
            [Split::Train, Split::Val, Split::Test].map(|s| task.len(s)),
            [6, 1, 3]
        );
        assert_eq!(
            (task.max_len(), task.vocab_size(), task.n_classes()),
            (1024, 256, 10)
        );
        assert_eq!(task.name(), "image");
        for index in 0..6 {
            let e = task.example(Split::Train, index);
            assert_eq!(e.label, index as u32);
            let expected: Vec<u32> = (0..PIXELS).map(|p| level(index, p)).collect();
            assert_eq!(e.ids, expected);
        }
        assert_eq!(task.example(Split::Val, 0).label, 6);
        let test = task.example(Split::Test, 2);
        assert_eq!(test.label, 7);
        assert_eq!(test.ids[5], level(102, 5));
        // the directory itself works too
        let direct = Cifar10::open(&parent.join(ARCHIVE_DIR), Setting::Full).unwrap();
        assert_eq!(direct.example(Split::Test, 1), task.example(Split::Test, 1));
        assert!(direct.source().contains("7 training + 3 test"));
        fs::remove_dir_all(&parent).unwrap();
    }

    #[test]
    fn colour_records_use_lra_grayscale() {
        let parent = fake_cifar("colour", true);
        let task = Cifar10::open(&parent, Setting::Full).unwrap();
        let raw = record(3, 3, true);
        let e = task.example(Split::Train, 3);
        for p in [0, 1, 500, 1023] {
            let (r, g, b) = (raw[1 + p], raw[1 + PIXELS + p], raw[1 + 2 * PIXELS + p]);
            assert_eq!(e.ids[p], grayscale(r, g, b) as u32);
        }
        fs::remove_dir_all(&parent).unwrap();
    }

    #[test]
    fn lite_setting_downsamples_and_caps_splits() {
        let parent = fake_cifar("lite", false);
        let task = Cifar10::open(&parent, Setting::Lite).unwrap();
        // 7 training images: all go to train, none is left for val.
        assert_eq!(
            [Split::Train, Split::Val, Split::Test].map(|s| task.len(s)),
            [7, 0, 3]
        );
        assert_eq!(task.max_len(), 256);
        let e = task.example(Split::Train, 2);
        assert_eq!(e.ids.len(), 256);
        let (row, col) = (3, 5);
        let sum: u32 = [(0, 0), (0, 1), (1, 0), (1, 1)]
            .iter()
            .map(|&(dr, dc)| level(2, (2 * row + dr) * SIDE + 2 * col + dc))
            .sum();
        assert_eq!(e.ids[row * 16 + col], (sum + 2) / 4);

        let capped = Cifar10::open_with_caps(&parent, Setting::Lite, [3, 2, 2]).unwrap();
        assert_eq!(
            [Split::Train, Split::Val, Split::Test].map(|s| capped.len(s)),
            [3, 2, 2]
        );
        let labels = |s: Split| -> Vec<u32> {
            (0..capped.len(s))
                .map(|i| capped.example(s, i).label)
                .collect()
        };
        assert_eq!(labels(Split::Train), vec![0, 1, 2]);
        assert_eq!(labels(Split::Val), vec![5, 6]);
        assert_eq!(labels(Split::Test), vec![9, 8]);

        let mut tsv = Vec::new();
        capped.write_tsv(Split::Val, 10, &mut tsv).unwrap();
        let text = String::from_utf8(tsv).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3);
        assert_eq!(lines[0], "Target\tPixels");
        let (label, pixels) = lines[1].split_once('\t').unwrap();
        assert_eq!(label, "5");
        let ids: Vec<u32> = pixels.split(' ').map(|p| p.parse().unwrap()).collect();
        assert_eq!(ids, capped.example(Split::Val, 0).ids);
        fs::remove_dir_all(&parent).unwrap();
    }

    #[test]
    fn missing_or_bad_files_are_reported() {
        let parent = std::env::temp_dir().join(format!("cifar-missing-{}", std::process::id()));
        let _ = fs::remove_dir_all(&parent);
        fs::create_dir_all(&parent).unwrap();
        let err = Cifar10::open(&parent, Setting::Lite).unwrap_err();
        for needle in ["data_batch_1.bin", TEST_FILE, DOWNLOAD_URL, ARCHIVE_DIR] {
            assert!(err.contains(needle), "{err}");
        }
        assert!(err.contains(&parent.display().to_string()), "{err}");

        fs::write(parent.join(TRAIN_FILES[0]), vec![0u8; RECORD_BYTES + 5]).unwrap();
        fs::write(parent.join(TEST_FILE), vec![0u8; RECORD_BYTES]).unwrap();
        let err = Cifar10::open(&parent, Setting::Full).unwrap_err();
        assert!(
            err.contains("data_batch_1.bin") && err.contains("3073"),
            "{err}"
        );

        let mut bad_label = vec![0u8; RECORD_BYTES];
        bad_label[0] = 10;
        fs::write(parent.join(TRAIN_FILES[0]), bad_label).unwrap();
        let err = Cifar10::open(&parent, Setting::Full).unwrap_err();
        assert!(err.contains("data_batch_1.bin record 1"), "{err}");
        fs::remove_dir_all(&parent).unwrap();
    }
}

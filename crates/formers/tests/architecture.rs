//! `ARCHITECTURE.md` names no stale paths or items. The rules, kept simple on purpose:
//!
//! - A span in backticks ending in `.rs` (and holding no `<`, as in `mixer/<kind>.rs`) is a
//!   file path: some file under `crates/` or `fuzz/` must have a path ending in `/` + it
//!   (`train/run.rs` matches `crates/formers/src/train/run.rs`; a bare `flash.rs` any
//!   `flash.rs`).
//! - A span in backticks holding `::` is an item path (`Type::method`, `module::item`): cut
//!   at its first `(` (`Model::new(cfg, &Params)`), expand a trailing `{a, b}` group, cut at
//!   the first space (`Capabilities::causal == false`); then every segment must appear as an
//!   identifier in the code (comments stripped) of a `.rs` file under `crates/*/src/`. Paths of
//!   other crates (`std`, `tokio`, `candle_core`, ...) are skipped.
//! - A span that is one CamelCase identifier (`QuantMatrix`) names a type, trait or variant:
//!   it must appear so too.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

/// Roots of paths outside this workspace, which the check skips.
const FOREIGN: &[&str] = &[
    "std",
    "core",
    "alloc",
    "tokio",
    "candle_core",
    "candle_nn",
    "serde",
];

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Every file under `dir`, skipping hidden directories and build output.
fn files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let path = e.path();
        let name = e.file_name().to_string_lossy().into_owned();
        if path.is_dir() {
            if !name.starts_with('.') && name != "target" {
                files(&path, out);
            }
        } else {
            out.push(path);
        }
    }
}

/// The spans between backticks, with their line numbers.
fn spans(text: &str) -> Vec<(usize, String)> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        for (k, part) in line.split('`').enumerate() {
            if k % 2 == 1 && !part.is_empty() {
                out.push((i + 1, part.to_string()));
            }
        }
    }
    out
}

/// The identifiers in the code of `src` (`//` comments removed).
fn identifiers(src: &str, out: &mut HashSet<String>) {
    for line in src.lines() {
        let code = line.split("//").next().unwrap_or("");
        for word in code.split(|c: char| !(c.is_alphanumeric() || c == '_')) {
            if !word.is_empty() {
                out.insert(word.to_string());
            }
        }
    }
}

/// The segments of an item path span, or `None` when the span is not one.
fn item_path(span: &str) -> Option<Vec<String>> {
    if !span.contains("::") {
        return None;
    }
    let span = span.split('(').next().unwrap();
    let (head, group) = match span.split_once("::{") {
        Some((head, rest)) => (head, rest.trim_end_matches('}')),
        None => (span.split(' ').next().unwrap(), ""),
    };
    let mut segments: Vec<String> = head.split("::").map(str::to_string).collect();
    segments.extend(group.split(',').map(|s| s.trim().to_string()));
    segments.retain(|s| !s.is_empty());
    let ident = |s: &String| {
        s.chars()
            .next()
            .is_some_and(|c| c.is_alphabetic() || c == '_')
            && s.chars().all(|c| c.is_alphanumeric() || c == '_')
    };
    segments.iter().all(ident).then_some(segments)
}

/// One CamelCase identifier: an upper-case letter, then a lower-case one, then word characters.
fn is_type_name(span: &str) -> bool {
    let mut chars = span.chars();
    chars.next().is_some_and(|c| c.is_ascii_uppercase())
        && chars.next().is_some_and(|c| c.is_ascii_lowercase())
        && chars.all(|c| c.is_alphanumeric() || c == '_')
}

#[test]
fn architecture_md_names_only_files_and_items_that_exist() {
    let root = repo();
    let text = std::fs::read_to_string(root.join("ARCHITECTURE.md")).unwrap();
    let mut all = Vec::new();
    files(&root.join("crates"), &mut all);
    files(&root.join("fuzz"), &mut all);
    let paths: Vec<String> = all
        .iter()
        .map(|p| p.to_string_lossy().replace('\\', "/"))
        .collect();
    let mut idents = HashSet::new();
    for p in all
        .iter()
        .filter(|p| p.extension().is_some_and(|e| e == "rs"))
    {
        let in_src = p.components().any(|c| c.as_os_str() == "src");
        if p.starts_with(root.join("crates")) && in_src {
            identifiers(&std::fs::read_to_string(p).unwrap(), &mut idents);
        }
    }

    let mut stale = Vec::new();
    let mut checked = (0, 0);
    for (line, span) in spans(&text) {
        if span.ends_with(".rs") && !span.contains('<') && !span.contains(' ') {
            checked.0 += 1;
            let suffix = format!("/{span}");
            if !paths.iter().any(|p| p.ends_with(&suffix)) {
                stale.push(format!("line {line}: no file `{span}`"));
            }
        } else if is_type_name(&span) {
            checked.1 += 1;
            if !idents.contains(&span) {
                stale.push(format!("line {line}: no `{span}` in the code"));
            }
        } else if let Some(segments) = item_path(&span) {
            if FOREIGN.contains(&segments[0].as_str()) {
                continue;
            }
            checked.1 += 1;
            for s in segments.iter().filter(|s| !idents.contains(*s)) {
                stale.push(format!("line {line}: `{span}`: no `{s}` in the code"));
            }
        }
    }
    assert!(stale.is_empty(), "ARCHITECTURE.md:\n{}", stale.join("\n"));
    // The rules must keep seeing what they check.
    assert!(checked.0 >= 5 && checked.1 >= 5, "{checked:?}");
}

#[test]
fn the_rules_catch_a_missing_method_and_read_the_span_forms() {
    assert_eq!(
        item_path("Model::new(cfg, &Params)").unwrap(),
        ["Model", "new"]
    );
    assert_eq!(
        item_path("formers::generate::{Sequence, step}").unwrap(),
        ["formers", "generate", "Sequence", "step"]
    );
    assert_eq!(
        item_path("Capabilities::causal == false").unwrap(),
        ["Capabilities", "causal"]
    );
    assert_eq!(item_path("a + b"), None);
    assert!(is_type_name("QuantMatrix") && !is_type_name("MAX_LAYERS") && !is_type_name("Usage:"));
    let mut idents = HashSet::new();
    identifiers(
        "trait HeadKernel { fn attend(&self); } // attend_merged",
        &mut idents,
    );
    assert!(idents.contains("HeadKernel") && idents.contains("attend"));
    assert!(!idents.contains("attend_merged"));
}

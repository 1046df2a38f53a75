//! The library's modules form layers: no import cycle, and no module imports one from a
//! layer above its own (the layer list is `ARCHITECTURE.md`'s, section "Layers").
//!
//! A module is a file of `crates/formers/src` (`mixer/mod.rs` is `mixer`). Its imports are
//! the `crate::`, `super::` and `self::` paths of its non-test code (`#[cfg(test)]` items
//! are left out), each resolved to the longest module prefix that is a file, and the child
//! modules a parent names by a relative path (`heads::MultiHead`). `lib.rs`, `testutil.rs`,
//! `*_tests.rs` and `fuzzing/` (test support) are not modules of the graph.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

fn src_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

/// Module name (`mixer/heads`) → its source.
fn modules() -> BTreeMap<String, String> {
    fn walk(dir: &Path, root: &Path, out: &mut BTreeMap<String, String>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(&path, root, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                let rel = path.strip_prefix(root).unwrap().with_extension("");
                let mut name = rel.to_string_lossy().replace('\\', "/");
                if let Some(parent) = name.strip_suffix("/mod") {
                    name = parent.to_string();
                }
                if name == "lib"
                    || name == "testutil"
                    || name.starts_with("fuzzing")
                    || name.ends_with("_tests")
                    || name.ends_with("/tests")
                {
                    continue;
                }
                out.insert(name, std::fs::read_to_string(&path).unwrap());
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(&src_dir(), &src_dir(), &mut out);
    out
}

/// `src` without its `#[cfg(test)]` items (a `mod` block, or the next item up to its `;`
/// or its closing brace). Comments and strings are not parsed: the sources keep braces
/// balanced in them.
fn without_tests(src: &str) -> String {
    let mut out = String::new();
    let mut rest = src;
    while let Some(at) = rest.find("#[cfg(test)]") {
        out.push_str(&rest[..at]);
        let after = &rest[at + "#[cfg(test)]".len()..];
        let bytes = after.as_bytes();
        let (mut depth, mut i) = (0usize, 0usize);
        while i < bytes.len() {
            match bytes[i] {
                b'{' => depth += 1,
                b'}' => {
                    depth -= 1;
                    if depth == 0 {
                        i += 1;
                        break;
                    }
                }
                b';' if depth == 0 => {
                    i += 1;
                    break;
                }
                _ => {}
            }
            i += 1;
        }
        rest = &after[i..];
    }
    out.push_str(rest);
    // Line comments may hold paths in prose (doc links): they are no imports.
    out.lines()
        .map(|l| l.split("//").next().unwrap_or(""))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The paths a `use` tree names: `a::{b, c::{d, e}}` → `a::b`, `a::c::d`, `a::c::e`.
fn expand(tree: &str) -> Vec<String> {
    let tree: String = tree.chars().filter(|c| !c.is_whitespace()).collect();
    let Some(open) = tree.find('{') else {
        return vec![tree];
    };
    let Some(close) = tree.rfind('}') else {
        return Vec::new();
    };
    let (prefix, inner) = (&tree[..open], &tree[open + 1..close]);
    let mut parts = Vec::new();
    let (mut depth, mut start) = (0, 0);
    for (i, c) in inner.char_indices() {
        match c {
            '{' => depth += 1,
            '}' => depth -= 1,
            ',' if depth == 0 => {
                parts.push(&inner[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&inner[start..]);
    parts
        .into_iter()
        .filter(|p| !p.is_empty())
        .flat_map(|p| expand(p).into_iter().map(move |x| format!("{prefix}{x}")))
        .collect()
}

/// Every path of `src` that starts at `crate`, `super` or `self`, as written.
fn paths(src: &str) -> Vec<String> {
    let mut out = Vec::new();
    // `use` items (whose trees may hold braces and span lines).
    let mut offset = 0;
    for line in src.split_inclusive('\n') {
        let item = line.trim_start();
        let item = item
            .strip_prefix("pub(crate) ")
            .or_else(|| item.strip_prefix("pub "))
            .unwrap_or(item);
        if let Some(tree) = item.strip_prefix("use ") {
            let start = offset + (line.len() - tree.len());
            let end = src[start..].find(';').map_or(src.len(), |e| start + e);
            out.extend(expand(&src[start..end]));
        }
        offset += line.len();
    }
    // Paths written inline.
    for start in ["crate::", "super::", "self::"] {
        let mut rest = src;
        while let Some(at) = rest.find(start) {
            let before_ok = at == 0 || {
                let b = rest.as_bytes()[at - 1];
                !(b.is_ascii_alphanumeric() || b == b'_' || b == b':')
            };
            let tail = &rest[at..];
            let end = tail
                .find(|c: char| !(c.is_alphanumeric() || c == '_' || c == ':'))
                .unwrap_or(tail.len());
            if before_ok {
                out.push(tail[..end].to_string());
            }
            rest = &tail[end.max(1)..];
        }
    }
    out
}

/// The module `path` (written in module `from`) names, if it is one of `mods` other than
/// `from` itself.
fn resolve(from: &str, path: &str, mods: &BTreeMap<String, String>) -> Option<String> {
    let mut segs: Vec<&str> = path.split("::").filter(|s| !s.is_empty()).collect();
    // `from`'s own module path: `mixer/heads` → [mixer, heads].
    let here: Vec<&str> = from.split('/').collect();
    let mut base: Vec<&str> = match segs.first() {
        Some(&"crate") => {
            segs.remove(0);
            Vec::new()
        }
        Some(&"self") => {
            segs.remove(0);
            here.clone()
        }
        Some(&"super") => {
            let mut base = here.clone();
            while segs.first() == Some(&"super") {
                segs.remove(0);
                base.pop();
            }
            base
        }
        _ => return None,
    };
    base.extend(segs);
    (1..=base.len())
        .rev()
        .map(|n| base[..n].join("/"))
        .find(|m| mods.contains_key(m))
        .filter(|m| m != from)
}

/// The child modules `src` (module `name`) names by a relative path (`heads::MultiHead`,
/// `use heads::MultiHead`): a parent that uses its child depends on it, as any importer.
fn children_used(name: &str, src: &str, mods: &BTreeMap<String, String>) -> Vec<String> {
    let prefix = if name.is_empty() {
        String::new()
    } else {
        format!("{name}/")
    };
    mods.keys()
        .filter_map(|m| m.strip_prefix(prefix.as_str()))
        .filter(|child| !child.contains('/'))
        .filter(|child| {
            let pat = format!("{child}::");
            src.match_indices(&pat).any(|(at, _)| {
                at == 0 || {
                    let b = src.as_bytes()[at - 1];
                    !(b.is_ascii_alphanumeric() || b == b'_' || b == b':')
                }
            })
        })
        .map(|child| format!("{prefix}{child}"))
        .collect()
}

fn graph() -> BTreeMap<String, BTreeSet<String>> {
    let mods = modules();
    mods.iter()
        .map(|(name, src)| {
            let code = without_tests(src);
            let mut deps: BTreeSet<String> = paths(&code)
                .iter()
                .filter_map(|p| resolve(name, p, &mods))
                .collect();
            deps.extend(children_used(name, &code, &mods));
            (name.clone(), deps)
        })
        .collect()
}

/// Strongly connected components of more than one module (Tarjan).
fn cycles(g: &BTreeMap<String, BTreeSet<String>>) -> Vec<Vec<String>> {
    struct State<'a> {
        g: &'a BTreeMap<String, BTreeSet<String>>,
        index: BTreeMap<&'a str, usize>,
        low: BTreeMap<&'a str, usize>,
        stack: Vec<&'a str>,
        on: BTreeSet<&'a str>,
        out: Vec<Vec<String>>,
    }
    fn visit<'a>(s: &mut State<'a>, v: &'a str) {
        let i = s.index.len();
        s.index.insert(v, i);
        s.low.insert(v, i);
        s.stack.push(v);
        s.on.insert(v);
        for w in s.g[v].iter() {
            if !s.index.contains_key(w.as_str()) {
                visit(s, w);
                let lw = s.low[w.as_str()];
                let lv = s.low.get_mut(v).unwrap();
                *lv = (*lv).min(lw);
            } else if s.on.contains(w.as_str()) {
                let iw = s.index[w.as_str()];
                let lv = s.low.get_mut(v).unwrap();
                *lv = (*lv).min(iw);
            }
        }
        if s.low[v] == s.index[v] {
            let mut comp = Vec::new();
            loop {
                let w = s.stack.pop().unwrap();
                s.on.remove(w);
                comp.push(w.to_string());
                if w == v {
                    break;
                }
            }
            if comp.len() > 1 {
                comp.sort();
                s.out.push(comp);
            }
        }
    }
    let mut s = State {
        g,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on: BTreeSet::new(),
        out: Vec::new(),
    };
    for v in g.keys() {
        if !s.index.contains_key(v.as_str()) {
            visit(&mut s, v);
        }
    }
    s.out
}

/// `ARCHITECTURE.md`'s layers, bottom first: the lines `N. `a`, `b/`, ...` of its section
/// "Layers"; `x/` stands for every module under `x` (and `x` itself).
fn layers() -> Vec<Vec<String>> {
    let text = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../ARCHITECTURE.md"),
    )
    .unwrap();
    let section = text
        .split("\n## ")
        .find(|s| s.starts_with("Layers"))
        .expect("ARCHITECTURE.md has a section `## Layers`");
    section
        .lines()
        .filter(|l| {
            l.trim_start()
                .split_once(". ")
                .is_some_and(|(n, _)| n.parse::<usize>().is_ok())
        })
        .map(|l| {
            l.split('`')
                .skip(1)
                .step_by(2)
                .map(str::to_string)
                .collect()
        })
        .collect()
}

fn layer_of(module: &str, layers: &[Vec<String>]) -> Option<usize> {
    // The most specific entry wins: `mixer/kind` before `mixer/`.
    let mut best: Option<(usize, usize)> = None;
    for (i, names) in layers.iter().enumerate() {
        for n in names {
            let len = if let Some(dir) = n.strip_suffix('/') {
                (module == dir || module.starts_with(n.as_str())).then_some(n.len() - 1)
            } else {
                (module == n).then_some(n.len() + 1)
            };
            if let Some(len) = len {
                if best.is_none_or(|(_, l)| len > l) {
                    best = Some((i, len));
                }
            }
        }
    }
    best.map(|(i, _)| i)
}

#[test]
fn the_library_has_no_import_cycle() {
    let g = graph();
    let found = cycles(&g);
    let mut msg = String::new();
    for comp in &found {
        msg.push_str(&format!(
            "cycle of {} modules: {}\n",
            comp.len(),
            comp.join(", ")
        ));
        for a in comp {
            for b in &g[a] {
                if comp.contains(b) {
                    msg.push_str(&format!("    {a} -> {b}\n"));
                }
            }
        }
    }
    assert!(found.is_empty(), "{msg}");
}

#[test]
fn no_module_imports_from_a_layer_above_its_own() {
    let g = graph();
    let layers = layers();
    assert!(
        layers.len() > 3,
        "ARCHITECTURE.md's layer list was not read"
    );
    let mut problems = Vec::new();
    for (m, deps) in &g {
        let Some(lm) = layer_of(m, &layers) else {
            problems.push(format!("{m}: in no layer of ARCHITECTURE.md"));
            continue;
        };
        for d in deps {
            match layer_of(d, &layers) {
                Some(ld) if ld > lm => problems.push(format!(
                    "{m} (layer {}) imports {d} (layer {})",
                    lm + 1,
                    ld + 1
                )),
                _ => {}
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn the_checker_sees_imports_and_cycles() {
    let src = "use crate::{a::B, c::{d::E, F}};\nfn f() { super::g(); }\n#[cfg(test)]\nmod tests { use crate::x::Y; }\n";
    let p = paths(&without_tests(src));
    assert!(p.contains(&"crate::a::B".to_string()), "{p:?}");
    assert!(p.contains(&"crate::c::d::E".to_string()), "{p:?}");
    assert!(p.contains(&"super::g".to_string()), "{p:?}");
    assert!(!p.iter().any(|x| x.contains("x::Y")), "{p:?}");
    let g: BTreeMap<String, BTreeSet<String>> = [
        ("a", vec!["b"]),
        ("b", vec!["c"]),
        ("c", vec!["a"]),
        ("d", vec!["a"]),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.into_iter().map(String::from).collect()))
    .collect();
    assert_eq!(cycles(&g), vec![vec!["a", "b", "c"]]);
}

/// Prints the modules by height (a module's layer is one above the highest it imports):
/// a starting point for `ARCHITECTURE.md`'s list after a change of structure.
/// `cargo test -p formers --test layers -- --ignored --nocapture`
#[test]
#[ignore]
fn print_heights() {
    let g = graph();
    fn height(
        m: &str,
        g: &BTreeMap<String, BTreeSet<String>>,
        memo: &mut BTreeMap<String, usize>,
    ) -> usize {
        if let Some(&h) = memo.get(m) {
            return h;
        }
        memo.insert(m.to_string(), 0); // a cycle ends here
        let h = g[m]
            .iter()
            .map(|d| height(d, g, memo) + 1)
            .max()
            .unwrap_or(0);
        memo.insert(m.to_string(), h);
        h
    }
    let mut memo = BTreeMap::new();
    let mut by_height: BTreeMap<usize, Vec<String>> = BTreeMap::new();
    for m in g.keys() {
        by_height
            .entry(height(m, &g, &mut memo))
            .or_default()
            .push(m.clone());
    }
    for (h, ms) in by_height {
        println!(
            "{}. {}",
            h + 1,
            ms.iter()
                .map(|m| format!("`{m}`"))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
}

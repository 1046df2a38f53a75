//! Arena variants: named model configs (`configs/arena/*.json`, embedded so the arena runs
//! from any directory) or any config file the user names. The suite sets the size keys
//! (`d_model`, `n_heads`, `n_layers`) and the task sets `input`, `max_len` and the head, so
//! every variant gets the same size budget and differs only in its parts; a variant file
//! that sets one of these keys is refused rather than silently overridden.

use std::path::Path;

use formers::config::ModelConfig;
use serde::{Deserialize, Serialize};

/// The shipped variants, in report order (`vanilla` is the baseline).
const BUILTIN: &[(&str, &str)] = &[
    (
        "vanilla",
        include_str!("../../../configs/arena/vanilla.json"),
    ),
    ("local", include_str!("../../../configs/arena/local.json")),
    (
        "masformer",
        include_str!("../../../configs/arena/masformer.json"),
    ),
    (
        "linformer",
        include_str!("../../../configs/arena/linformer.json"),
    ),
    (
        "linear-elu",
        include_str!("../../../configs/arena/linear-elu.json"),
    ),
    (
        "performer",
        include_str!("../../../configs/arena/performer.json"),
    ),
    ("flow", include_str!("../../../configs/arena/flow.json")),
    (
        "poolformer",
        include_str!("../../../configs/arena/poolformer.json"),
    ),
    (
        "matformer",
        include_str!("../../../configs/arena/matformer.json"),
    ),
    ("lrt", include_str!("../../../configs/arena/lrt.json")),
    (
        "denseformer",
        include_str!("../../../configs/arena/denseformer.json"),
    ),
];

/// A named model to put in the arena.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Variant {
    pub name: String,
    /// One line for the report: what it is and which paper.
    pub description: String,
    pub model: ModelConfig,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct VariantFile {
    description: String,
    model: ModelConfig,
}

/// Model keys the suite sets for every variant (size from the suite; input, length and
/// head from the task), with the value a variant holds until then.
const SUITE_KEYS: &[(&str, &str)] = &[
    ("d_model", "64"),
    ("n_heads", "4"),
    ("n_layers", "2"),
    ("max_len", "512"),
    ("input", r#"{"kind": "bytes"}"#),
    (
        "head",
        r#"{"kind": "classification", "n_classes": 2, "pooling": "mean"}"#,
    ),
];

fn parse(name: &str, text: &str, origin: &str) -> Result<Variant, String> {
    let err = |e: String| format!("variant `{name}` ({origin}): {e}");
    let mut value: serde_json::Value =
        serde_json::from_str(text).map_err(|e| err(e.to_string()))?;
    if let Some(model) = value.get_mut("model").and_then(|m| m.as_object_mut()) {
        for (key, placeholder) in SUITE_KEYS {
            if model.contains_key(*key) {
                return Err(err(format!(
                    "`model.{key}` is set by the arena suite (every variant gets the suite's \
                     size and the task's input, max_len and head); remove it from the file"
                )));
            }
            let v = serde_json::from_str(placeholder).expect("placeholders are JSON");
            model.insert(key.to_string(), v);
        }
    }
    let file: VariantFile = serde_json::from_value(value).map_err(|e| err(e.to_string()))?;
    Ok(Variant {
        name: name.to_string(),
        description: file.description,
        model: file.model,
    })
}

/// Names of the shipped variants, in report order.
pub fn builtin_names() -> Vec<&'static str> {
    BUILTIN.iter().map(|(n, _)| *n).collect()
}

/// The variants a run takes when none are named: one of each family of token mixer
/// (exact, sliding window, kernelised linear, random features, low rank), so the default
/// arena fits its 15 minutes on two cores. `--variants all` takes every shipped one.
pub const DEFAULT: &[&str] = &["vanilla", "local", "linear-elu", "performer", "linformer"];

/// The variants of `--variants`: none named = [`DEFAULT`]; `all` = every shipped variant;
/// otherwise [`resolve`].
pub fn chosen(specs: &[String]) -> Result<Vec<Variant>, String> {
    match specs {
        [] => resolve(&DEFAULT.iter().map(|s| s.to_string()).collect::<Vec<_>>()),
        [all] if all == "all" => Ok(builtin()),
        _ => resolve(specs),
    }
}

/// Every shipped variant.
pub fn builtin() -> Vec<Variant> {
    BUILTIN
        .iter()
        .map(|(n, t)| parse(n, t, "built in").expect("shipped variant configs parse"))
        .collect()
}

/// Variants by name (shipped ones) or by path to a JSON file of the same layout
/// (`{"description": ..., "model": {...}}`; its file stem becomes the name).
pub fn resolve(specs: &[String]) -> Result<Vec<Variant>, String> {
    specs
        .iter()
        .map(|s| {
            if let Some((name, text)) = BUILTIN.iter().find(|(n, _)| n == s) {
                return parse(name, text, "built in");
            }
            let path = Path::new(s);
            if path.extension().is_some_and(|e| e == "json") {
                let text = std::fs::read_to_string(path)
                    .map_err(|e| format!("variant file {}: {e}", path.display()))?;
                let name = path
                    .file_stem()
                    .map(|s| s.to_string_lossy().into_owned())
                    .unwrap_or_else(|| s.clone());
                return parse(&name, &text, &path.display().to_string());
            }
            Err(format!(
                "unknown variant `{s}`; expected one of {} or a path to a .json variant file",
                builtin_names().join(", ")
            ))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_is_a_shipped_subset_and_all_is_every_variant() {
        let names = |v: Vec<Variant>| v.into_iter().map(|v| v.name).collect::<Vec<_>>();
        let default = names(chosen(&[]).unwrap());
        assert_eq!(default, DEFAULT);
        assert!(default.len() < BUILTIN.len());
        assert!(default
            .iter()
            .all(|n| builtin_names().contains(&n.as_str())));
        assert_eq!(names(chosen(&["all".into()]).unwrap()), builtin_names());
        let two = names(chosen(&["flow".into(), "vanilla".into()]).unwrap());
        assert_eq!(two, ["flow", "vanilla"]);
        assert!(chosen(&["nope".into()]).is_err());
    }

    #[test]
    fn shipped_variants_parse_and_unknown_names_are_explained() {
        let all = builtin();
        assert_eq!(all.len(), BUILTIN.len());
        assert_eq!(all[0].name, "vanilla");
        let err = resolve(&["nope".into()]).unwrap_err();
        assert!(err.contains("vanilla") && err.contains("nope"), "{err}");
        let two = resolve(&["flow".into(), "local".into()]).unwrap();
        assert_eq!(two[1].name, "local");
    }

    #[test]
    fn variant_files_may_not_set_keys_the_suite_sets() {
        let body =
            r#"{"description": "d", "model": {"defaults": {"mixer": {"kind": "attention"}}}}"#;
        let ok = parse("mine", body, "mine.json").unwrap();
        assert_eq!(ok.model.defaults, builtin()[0].model.defaults);
        for (key, value) in [
            ("d_model", "128"),
            ("n_heads", "8"),
            ("n_layers", "6"),
            ("max_len", "64"),
            ("input", r#"{"kind": "bytes"}"#),
            ("head", r#"{"kind": "lm"}"#),
        ] {
            let text = body.replacen(
                r#""model": {"#,
                &format!(r#""model": {{"{key}": {value}, "#),
                1,
            );
            let e = parse("mine", &text, "mine.json").unwrap_err();
            assert!(
                e.contains(&format!("`model.{key}`")) && e.contains("set by the arena suite"),
                "{key}: {e}"
            );
        }
    }
}

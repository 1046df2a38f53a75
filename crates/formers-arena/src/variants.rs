//! Arena variants: named model configs (`configs/arena/*.json`, embedded so the arena runs
//! from any directory) or any config file the user names. The suite sets the size keys
//! (`d_model`, `n_heads`, `n_layers`) and the task sets `input`, `max_len` and the head, so
//! every variant gets the same size budget and differs only in its parts.

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

fn parse(name: &str, text: &str, origin: &str) -> Result<Variant, String> {
    let file: VariantFile =
        serde_json::from_str(text).map_err(|e| format!("variant `{name}` ({origin}): {e}"))?;
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
    fn shipped_variants_parse_and_unknown_names_are_explained() {
        let all = builtin();
        assert_eq!(all.len(), BUILTIN.len());
        assert_eq!(all[0].name, "vanilla");
        let err = resolve(&["nope".into()]).unwrap_err();
        assert!(err.contains("vanilla") && err.contains("nope"), "{err}");
        let two = resolve(&["flow".into(), "local".into()]).unwrap();
        assert_eq!(two[1].name, "local");
    }
}

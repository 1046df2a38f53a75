//! Int8 weights after training (the weight-only int8 of the inference-optimisation surveys,
//! e.g. LLM.int8()'s per-channel absmax, without its outlier split): every matrix of the
//! model — linear layers and embedding tables — stored as int8 with one f32 scale per row.
//! Linear layers then multiply in integers ([`crate::kernels::int8`]); tables are
//! dequantised when loaded. Biases, norms and other vectors stay f32.

use std::collections::BTreeMap;

use candle_core::DType;

use crate::config::FfnSpec;
use crate::kernels::int8::Int8Matrix;
use crate::pretrained::native::{Manifest, Step, Stored};
use crate::pretrained::Pretrained;
use crate::{Error, Result};

/// How weights are quantised.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheme {
    /// Symmetric int8, one scale per row (output channel), values in [-127, 127].
    Int8,
}

impl Scheme {
    /// The name on the command line and in `formers.json`.
    pub fn name(self) -> &'static str {
        match self {
            Scheme::Int8 => "int8",
        }
    }
}

/// Whether the parameter `name` of `dims` is stored as int8: every matrix called `weight`
/// (linear layers, embedding tables), nothing else.
pub fn is_quantised(name: &str, dims: &[usize]) -> bool {
    dims.len() == 2 && name.ends_with(".weight")
}

/// The manifest and tensors of `p` with its matrices quantised by `scheme`. Refused for a
/// model already quantised, and for MatFormer MLPs (their nested widths slice `down`'s
/// columns, which per-row scales do not allow: extract a sub-model first).
pub fn quantize(p: &Pretrained, scheme: Scheme) -> Result<(Manifest, BTreeMap<String, Stored>)> {
    super::refuse_after(
        p,
        |s| matches!(s, Step::Quantize { .. }),
        "the model is already quantised; quantise the original instead",
    )?;
    for i in 0..p.config.n_layers {
        if matches!(p.config.layer(i).ffn, FfnSpec::MatFormer { .. }) {
            return Err(Error::config(
                format!("layers.{i}.ffn"),
                "a MatFormer MLP cannot be quantised as a whole; extract a sub-model first",
            ));
        }
    }
    let mut out = BTreeMap::new();
    let mut matrices = 0;
    for (name, t) in p.params.tensors() {
        let dims = t.dims().to_vec();
        let stored = if is_quantised(&name, &dims) {
            matrices += 1;
            let values = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
            if let Some(i) = values.iter().position(|v| !v.is_finite()) {
                return Err(Error::config(
                    name,
                    format!("value {i} is {}, which has no int8 code", values[i]),
                ));
            }
            Stored::Int8(Int8Matrix::quantize(&values, dims[0], dims[1]))
        } else {
            Stored::of(&t)?
        };
        out.insert(name, stored);
    }
    let step = Step::Quantize {
        scheme: scheme.name().into(),
        matrices,
    };
    Ok((super::manifest_after(p, &p.config, step), out))
}

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};

    use candle_core::Tensor;
    use safetensors::tensor::TensorView;
    use safetensors::{Dtype, SafeTensors};

    use super::*;
    use crate::model::ids_tensor;
    use crate::pretrained::{self, native, Family};
    use crate::testutil::fixture;

    fn scratch(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("formers-q-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    /// `name` quantised into a new directory (returned with the loaded original).
    fn quantised(name: &str, tag: &str) -> (Pretrained, PathBuf) {
        let p = pretrained::load(&fixture(name)).unwrap();
        let (manifest, tensors) = quantize(&p, Scheme::Int8).unwrap();
        let out = scratch(tag);
        native::write(&out, &manifest, &tensors, &p.dir.join("tokenizer.json")).unwrap();
        (p, out)
    }

    fn rel_err(got: &Tensor, want: &Tensor) -> f32 {
        let diff = (got - want).unwrap().sqr().unwrap().sum_all().unwrap();
        let norm = want.sqr().unwrap().sum_all().unwrap();
        (diff.to_scalar::<f32>().unwrap() / norm.to_scalar::<f32>().unwrap()).sqrt()
    }

    #[test]
    fn int8_models_load_with_integer_layers_and_stay_close() {
        for (name, family) in [("tiny-bert", Family::Bert), ("tiny-gpt2", Family::Gpt2)] {
            let (p, dir) = quantised(name, name);
            let q = pretrained::load(&dir).unwrap();
            assert_eq!(q.family, family);
            assert!(q.unused.is_empty(), "{:?}", q.unused);
            assert_eq!(q.compression.len(), 1);
            // Linear weights stay int8 (never f32 parameters); tables are dequantised.
            let names: Vec<String> = q.params.vars().into_iter().map(|(n, _)| n).collect();
            assert!(!names
                .iter()
                .any(|n| n.contains(".mixer.") && n.ends_with(".weight")));
            assert!(names.contains(&"embed.weight".to_string()));
            let ids = ids_tensor(&[1, 5, 9, 3, 7, 2, 8]).unwrap();
            let want = p.model.forward(&ids, None, None).unwrap();
            let got = q.model.forward(&ids, None, None).unwrap();
            // Per-row int8 of weights and activations: each rounding is at most half a step
            // of 1/127 of the row's max, ~0.4% relative; a few layers compound to ≲ 3%.
            let err = rel_err(&got, &want);
            assert!(err < 0.03, "{name}: relative error {err}");
            assert!(err > 0.0, "{name}: nothing was quantised");
            let bytes = |d: &Path| {
                std::fs::metadata(d.join("model.safetensors"))
                    .unwrap()
                    .len()
            };
            let ratio = bytes(&dir) as f64 / bytes(&p.dir) as f64;
            assert!(ratio < 0.4, "{name}: {ratio}");
            std::fs::remove_dir_all(&dir).unwrap();
        }
    }

    #[test]
    fn quantising_twice_is_refused_and_a_full_output_directory_is_kept() {
        let (p, dir) = quantised("tiny-bert", "twice");
        let q = pretrained::load(&dir).unwrap();
        let e = quantize(&q, Scheme::Int8).unwrap_err().to_string();
        assert!(e.contains("already quantised"), "{e}");
        let (manifest, tensors) = quantize(&p, Scheme::Int8).unwrap();
        let e = native::write(&dir, &manifest, &tensors, &p.dir.join("tokenizer.json"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("not empty"), "{e}");
        assert!(pretrained::load(&dir).is_ok());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Rewrites `dir/model.safetensors` with `edit` applied to (name, dtype, shape, bytes).
    fn edit(dir: &Path, edit: impl FnOnce(&mut Vec<(String, Dtype, Vec<usize>, Vec<u8>)>)) {
        let path = dir.join("model.safetensors");
        let bytes = std::fs::read(&path).unwrap();
        let st = SafeTensors::deserialize(&bytes).unwrap();
        let mut all: Vec<_> = st
            .tensors()
            .into_iter()
            .map(|(n, v)| (n, v.dtype(), v.shape().to_vec(), v.data().to_vec()))
            .collect();
        edit(&mut all);
        let views = all
            .iter()
            .map(|(n, d, s, b)| (n.clone(), TensorView::new(*d, s.clone(), b).unwrap()));
        std::fs::write(&path, safetensors::serialize(views, None).unwrap()).unwrap();
    }

    #[test]
    fn broken_int8_checkpoints_fail_with_a_clear_error() {
        type Edit = Box<dyn FnOnce(&mut Vec<(String, Dtype, Vec<usize>, Vec<u8>)>)>;
        let q = "layers.0.mixer.q.weight";
        let cases: Vec<(&str, Edit, &str)> = vec![
            (
                "no-scale",
                Box::new(move |t| t.retain(|e| e.0 != format!("{q}_scale"))),
                "scales `layers.0.mixer.q.weight_scale` are missing",
            ),
            (
                "min",
                Box::new(move |t| {
                    let e = t.iter_mut().find(|e| e.0 == q).unwrap();
                    e.3[0] = 0x80;
                }),
                "-128",
            ),
            (
                "scale-shape",
                Box::new(move |t| {
                    let e = t.iter_mut().find(|e| e.0 == format!("{q}_scale")).unwrap();
                    e.2 = vec![e.2[0] / 2];
                    e.3.truncate(e.3.len() / 2);
                }),
                "expected F32 of shape",
            ),
            (
                "shape",
                Box::new(move |t| {
                    let e = t.iter_mut().find(|e| e.0 == q).unwrap();
                    e.2 = vec![e.2[1], e.2[0] / 2];
                    e.3.truncate(e.3.len() / 2);
                }),
                "expected an int8 matrix of shape",
            ),
        ];
        for (tag, f, want) in cases {
            let (_, dir) = quantised("tiny-bert", tag);
            edit(&dir, f);
            let e = pretrained::load(&dir).unwrap_err().to_string();
            assert!(e.contains(want), "{tag}: {e}");
            std::fs::remove_dir_all(&dir).unwrap();
        }
        // A manifest of another format, or a config that does not validate.
        let (_, dir) = quantised("tiny-bert", "manifest");
        let path = dir.join(native::MANIFEST);
        let text = std::fs::read_to_string(&path).unwrap();
        std::fs::write(&path, text.replace("\"version\": 1", "\"version\": 9")).unwrap();
        let e = pretrained::load(&dir).unwrap_err().to_string();
        assert!(e.contains("version 9"), "{e}");
        std::fs::write(&path, text.replace("\"n_layers\": 2", "\"n_layers\": 0")).unwrap();
        let e = pretrained::load(&dir).unwrap_err().to_string();
        assert!(e.contains("n_layers"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

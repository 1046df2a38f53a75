//! Int8 weights after training (the weight-only int8 of the inference-optimisation surveys,
//! e.g. LLM.int8()'s per-channel absmax, without its outlier split): every matrix of the
//! model — linear layers and embedding tables — stored as int8 with one f32 scale per row,
//! or in blocks of 32 values with one scale each (GGML's Q8_0 and Q4_0 layouts, as
//! llama.cpp's quantisations). Linear layers then multiply in integers
//! ([`crate::kernels::int8`], [`crate::kernels::blockq`]); tables are dequantised when
//! loaded. Biases, norms and other vectors stay f32.

use std::collections::BTreeMap;

use candle_core::DType;

use crate::ffn::FfnSpec;
use crate::kernels::blockq::{BlockKind, BlockMatrix};
use crate::kernels::int8::Int8Matrix;
use crate::kernels::quant::QuantMatrix;
use crate::pretrained::native::{Manifest, Step, Stored};
use crate::pretrained::Pretrained;
use crate::{Error, Result};

/// How weights are quantised.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheme {
    /// Symmetric int8, one scale per row (output channel), values in [-127, 127].
    Int8,
    /// 8-bit codes in blocks of 32 values of a row, one f32 scale per block.
    Q8_0,
    /// 4-bit codes in blocks of 32 values of a row, one f32 scale per block.
    Q4_0,
}

impl Scheme {
    /// The name on the command line and in `formers.json`.
    pub fn name(self) -> &'static str {
        match self {
            Scheme::Int8 => "int8",
            Scheme::Q8_0 => "q8_0",
            Scheme::Q4_0 => "q4_0",
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
                    format!("value {i} is {}, which has no integer code", values[i]),
                ));
            }
            let (rows, cols) = (dims[0], dims[1]);
            Stored::Quant(match scheme {
                Scheme::Int8 => QuantMatrix::Int8(Int8Matrix::quantize(&values, rows, cols)),
                Scheme::Q8_0 => {
                    QuantMatrix::Block(BlockMatrix::quantize(BlockKind::Q8_0, &values, rows, cols))
                }
                Scheme::Q4_0 => {
                    QuantMatrix::Block(BlockMatrix::quantize(BlockKind::Q4_0, &values, rows, cols))
                }
            })
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
    use crate::pretrained::{self, native};
    use crate::testutil::fixture;

    fn scratch(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("formers-q-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    /// `name` quantised to int8 into a new directory (returned with the loaded original).
    fn quantised(name: &str, tag: &str) -> (Pretrained, PathBuf) {
        quantised_with(name, tag, Scheme::Int8)
    }

    fn quantised_with(name: &str, tag: &str, scheme: Scheme) -> (Pretrained, PathBuf) {
        let p = pretrained::load(&fixture(name)).unwrap();
        let (manifest, tensors) = quantize(&p, scheme).unwrap();
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
        for (name, family) in [("tiny-bert", "bert"), ("tiny-gpt2", "gpt2")] {
            let (p, dir) = quantised(name, name);
            let q = pretrained::load(&dir).unwrap();
            assert_eq!(q.family.name(), family);
            assert!(q.unused.is_empty(), "{:?}", q.unused);
            assert_eq!(q.compression.len(), 1);
            // Linear weights and the token table stay int8 (never f32 parameters); the
            // position table is dequantised.
            let names: Vec<String> = q.params.vars().into_iter().map(|(n, _)| n).collect();
            assert!(!names
                .iter()
                .any(|n| n.contains(".mixer.") && n.ends_with(".weight")));
            assert!(!names.contains(&"embed.weight".to_string()), "{names:?}");
            assert!(names.iter().any(|n| n.starts_with("pos.")), "{names:?}");
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
    fn block_formats_load_with_integer_layers_and_cost_what_their_bits_say() {
        for name in ["tiny-bert", "tiny-gpt2"] {
            let ids = ids_tensor(&[1, 5, 9, 3, 7, 2, 8]).unwrap();
            let mut errs = Vec::new();
            for scheme in [Scheme::Int8, Scheme::Q8_0, Scheme::Q4_0] {
                let tag = format!("{name}-{}", scheme.name());
                let (p, dir) = quantised_with(name, &tag, scheme);
                let q = pretrained::load(&dir).unwrap();
                assert!(q.unused.is_empty(), "{tag}: {:?}", q.unused);
                let names: Vec<String> = q.params.vars().into_iter().map(|(n, _)| n).collect();
                assert!(
                    !names
                        .iter()
                        .any(|n| n.contains(".mixer.") && n.ends_with(".weight")),
                    "{tag}: a linear weight was loaded as f32"
                );
                let want = p.model.forward(&ids, None, None).unwrap();
                let got = q.model.forward(&ids, None, None).unwrap();
                errs.push(rel_err(&got, &want));
                std::fs::remove_dir_all(&dir).unwrap();
            }
            let [int8, q8, q4] = errs[..] else {
                unreachable!()
            };
            // Scales per 32 values are finer than per row: Q8_0 is at least as close as
            // int8. Four bits are 16× coarser steps than eight: Q4_0 is far off both, but
            // within ~10% per layer (a few layers compound).
            assert!(
                q8 > 0.0 && q8 <= int8 * 1.05,
                "{name}: q8_0 {q8}, int8 {int8}"
            );
            assert!(q4 > 4.0 * q8 && q4 < 0.4, "{name}: q4_0 {q4}, q8_0 {q8}");
        }
    }

    #[test]
    fn broken_block_checkpoints_fail_with_a_clear_error() {
        let q = "layers.0.mixer.q.weight";
        let (_, dir) = quantised_with("tiny-bert", "broken-q4", Scheme::Q4_0);
        edit(&dir, |t| {
            let e = t.iter_mut().find(|e| e.0 == q).unwrap();
            e.2[1] *= 2; // as many bytes per row as Q8_0
            e.3.extend(e.3.clone());
        });
        let e = pretrained::load(&dir).unwrap_err().to_string();
        assert!(e.contains("expected q4_0 codes of shape"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
        let (_, dir) = quantised_with("tiny-bert", "broken-q8", Scheme::Q8_0);
        edit(&dir, |t| {
            let e = t.iter_mut().find(|e| e.0 == format!("{q}_scale")).unwrap();
            e.3[0..4].copy_from_slice(&f32::NAN.to_le_bytes());
        });
        let e = pretrained::load(&dir).unwrap_err().to_string();
        assert!(e.contains("weight_scale` holds NaN"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
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
                "expected int8 codes of shape [",
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

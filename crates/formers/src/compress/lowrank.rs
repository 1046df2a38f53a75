//! Low-rank factorisation after training (Greenformers' LRT, Winata et al. 2020): each
//! selected linear layer `W [out, in]` becomes `weight [out, r] · factor [r, in]` from its
//! truncated SVD (the best rank-r approximation, Eckart–Young), which is the form
//! `Linear::with_rank` builds. One rank per layer's MLP (shared by up, down and gate) and
//! one per layer's attention projections (q, k, v, o), as the config expresses them.

use std::collections::BTreeMap;

use candle_core::DType;

use super::heal::{heal, Heal};
use super::svd::{balance, cholesky_damped, unwhiten, whiten, Decomposition, Rank};
use crate::config::LayerOverride;
use crate::ffn::FfnSpec;
use crate::mixer::MixerSpec;
use crate::pretrained::native::{Manifest, Step, Stored};
use crate::pretrained::Pretrained;
use crate::{Error, Result};

/// Which layers are factorised.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layers {
    /// The MLPs' up, down (and gate) matrices.
    Ffn,
    /// The attention projections q, k, v, o.
    Attn,
    /// Both.
    All,
}

impl Layers {
    /// The name on the command line and in `formers.json`.
    pub fn name(self) -> &'static str {
        match self {
            Layers::Ffn => "ffn",
            Layers::Attn => "attn",
            Layers::All => "all",
        }
    }
}

/// What was factorised: `(module, rank, parameters before, after)` per group.
pub type Summary = Vec<(String, usize, usize, usize)>;

/// Checks `rank` before any work: a fixed rank of at least 1, an energy in (0, 1].
pub fn check_rank(rank: Rank) -> Result<()> {
    match rank {
        Rank::Fixed(0) => Err(Error::Input("--rank must be at least 1".into())),
        Rank::Energy(e) if !(e > 0.0 && e <= 1.0) => Err(Error::Input(format!(
            "--energy must be in (0, 1], found {e}"
        ))),
        _ => Ok(()),
    }
}

/// The manifest and tensors of `p` with the `layers` factorised at `rank`, and a summary.
/// Refused for a quantised model, a MatFormer MLP, a mixer without dense q/k/v/o, a layer
/// already low-rank, and a fixed rank larger than a selected matrix allows.
pub fn lowrank(
    p: &Pretrained,
    rank: Rank,
    layers: Layers,
) -> Result<(Manifest, BTreeMap<String, Stored>, Summary)> {
    lowrank_healed(p, rank, layers, None)
}

/// Texts to heal on, how, and a callback after every step (`step`, `loss`).
pub type Healing<'a> = (&'a Heal, &'a [Vec<u32>], &'a mut dyn FnMut(usize, f32));

/// [`lowrank`], then, with `healing`, the factorised model distilled towards `p` on the
/// texts ([`heal`]).
pub fn lowrank_healed(
    p: &Pretrained,
    rank: Rank,
    layers: Layers,
    healing: Option<Healing<'_>>,
) -> Result<(Manifest, BTreeMap<String, Stored>, Summary)> {
    lowrank_with(p, rank, layers, None, healing)
}

/// [`lowrank_healed`]; with `calibration` (token ids of texts), each MLP matrix is
/// factorised data-aware ([`factorise_whitened`]): best on the inputs it reads on those
/// texts rather than in the plain matrix norm. Attention projections stay plain.
pub fn lowrank_with(
    p: &Pretrained,
    rank: Rank,
    layers: Layers,
    calibration: Option<&[Vec<u32>]>,
    healing: Option<Healing<'_>>,
) -> Result<(Manifest, BTreeMap<String, Stored>, Summary)> {
    check_rank(rank)?;
    super::refuse_after(
        p,
        |s| matches!(s, Step::Quantize { .. }),
        "the model is quantised; factorise before quantising",
    )?;
    let whitening = match calibration {
        Some(texts) if matches!(layers, Layers::Ffn | Layers::All) => calibrate(p, texts)?,
        _ => BTreeMap::new(),
    };
    let mut tensors = p.params.tensors();
    let mut cfg = p.config.clone();
    let mut summary = Summary::new();
    for i in 0..cfg.n_layers {
        let spec = cfg.layer(i);
        let mut over = cfg.layers.get(&i.to_string()).cloned().unwrap_or_default();
        if matches!(layers, Layers::Ffn | Layers::All) {
            let FfnSpec::Mlp {
                hidden,
                activation,
                bias,
                rank: None,
            } = spec.ffn
            else {
                return Err(Error::config(
                    format!("layers.{i}.ffn"),
                    "only a dense MLP (no rank, not MatFormer) is factorised",
                ));
            };
            let names: Vec<String> = ["up", "gate", "down"]
                .iter()
                .map(|m| format!("layers.{i}.ffn.{m}"))
                .filter(|m| tensors.contains_key(&format!("{m}.weight")))
                .collect();
            let r = factorise_group(&mut tensors, &names, rank, &whitening, &mut summary)?;
            over.ffn = Some(FfnSpec::Mlp {
                hidden,
                activation,
                bias,
                rank: Some(r),
            });
        }
        if matches!(layers, Layers::Attn | Layers::All) {
            let MixerSpec::Attention(mut a) = spec.mixer else {
                return Err(Error::config(
                    format!("layers.{i}.mixer"),
                    "only the `attention` mixer's projections are factorised",
                ));
            };
            if a.rank.is_some() {
                return Err(Error::config(
                    format!("layers.{i}.mixer.rank"),
                    "the projections are already low-rank",
                ));
            }
            let names: Vec<String> = ["q", "k", "v", "o"]
                .iter()
                .map(|m| format!("layers.{i}.mixer.{m}"))
                .collect();
            let none = BTreeMap::new();
            a.rank = Some(factorise_group(
                &mut tensors,
                &names,
                rank,
                &none,
                &mut summary,
            )?);
            over.mixer = Some(MixerSpec::Attention(a));
        }
        if over != LayerOverride::default() {
            cfg.layers.insert(i.to_string(), over);
        }
    }
    cfg.validate()?;
    let heal_steps = healing.as_ref().map_or(0, |(h, ..)| h.steps);
    if let Some((h, texts, each)) = healing {
        let groups: Vec<String> = summary.iter().map(|(g, ..)| format!("{g}.")).collect();
        let changed = |name: &str| {
            h.scope
                .trains(name, groups.iter().any(|g| name.starts_with(g.as_str())))
        };
        tensors = heal(&cfg, &tensors, &p.model, texts, h, changed, each)?;
    }
    let step = Step::Lowrank {
        layers: layers.name().into(),
        rank: match rank {
            Rank::Fixed(r) => Some(r),
            Rank::Energy(_) => None,
        },
        energy: match rank {
            Rank::Energy(e) => Some(e),
            Rank::Fixed(_) => None,
        },
        calibration: match whitening.is_empty() {
            true => 0,
            false => calibration.map_or(0, <[_]>::len),
        },
        heal_steps,
    };
    let manifest = super::manifest_after(p, &cfg, step);
    Ok((manifest, super::stored_f32(&tensors)?, summary))
}

/// Factorises the matrices `{name}.weight` of one group at one rank (the largest any of
/// them needs for an energy), replacing each by `{name}.weight [out, r]` and
/// `{name}.factor [r, in]`; returns the rank.
/// With a whitening `S` for a matrix in `whitening` (by module name), that matrix is
/// factorised data-aware.
fn factorise_group(
    tensors: &mut BTreeMap<String, candle_core::Tensor>,
    names: &[String],
    rank: Rank,
    whitening: &BTreeMap<String, Vec<f64>>,
    summary: &mut Summary,
) -> Result<usize> {
    let mut parts = Vec::new();
    for name in names {
        let key = format!("{name}.weight");
        let t = tensors
            .get(&key)
            .ok_or_else(|| Error::config(key.clone(), "weight missing for the factorisation"))?;
        let (out, inp) = t.dims2()?;
        if let Rank::Fixed(r) = rank {
            if r > out.min(inp) {
                return Err(Error::Input(format!(
                    "--rank {r} is larger than `{name}` ({out}×{inp}) allows (at most {})",
                    out.min(inp)
                )));
            }
        }
        let w = t.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
        let s = whitening.get(name.as_str());
        let w = match s {
            Some(s) => whiten(&w, out, inp, s),
            None => w,
        };
        let d = Decomposition::new(&w, out, inp);
        parts.push((name, key, w, d, out, inp, s));
    }
    let r = parts
        .iter()
        .map(|(.., d, _, _, _)| d.rank(rank))
        .max()
        .unwrap_or(1);
    let (mut before, mut after) = (0, 0);
    let device = candle_core::Device::Cpu;
    for (name, key, w, d, out, inp, s) in parts {
        let mut f = d.factors(&w, r);
        if let Some(s) = s {
            unwhiten(&mut f, s, inp);
            balance(&mut f, out, inp);
        }
        let dtype = tensors[&key].dtype();
        let weight = candle_core::Tensor::from_vec(f.weight, (out, f.rank), &device)?;
        let factor = candle_core::Tensor::from_vec(f.factor, (f.rank, inp), &device)?;
        tensors.insert(key, weight.to_dtype(dtype)?);
        tensors.insert(format!("{name}.factor"), factor.to_dtype(dtype)?);
        before += out * inp;
        after += f.rank * (out + inp);
    }
    let group = names
        .first()
        .and_then(|n| n.rsplit_once('.'))
        .map_or(String::new(), |(g, _)| g.to_string());
    summary.push((group, r, before, after));
    Ok(r)
}

/// Damping of the inputs' second moment before its Cholesky factor (a fraction of its
/// mean diagonal): keeps directions the texts never excite from blowing up `S⁻¹`.
const DAMPING: f64 = 1e-3;

/// Texts per forward pass of the calibration.
const CALIBRATION_BATCH: usize = 16;

/// The whitening `S` (`S Sᵀ = XᵀX + δ`, [`cholesky_damped`]) of the inputs each dense
/// MLP matrix reads on `texts`, by module name: `up` and `gate` read the MLP's input,
/// `down` the hidden activations (computed from the original weights).
fn calibrate(p: &Pretrained, texts: &[Vec<u32>]) -> Result<BTreeMap<String, Vec<f64>>> {
    use candle_core::Tensor;
    if texts.is_empty() {
        return Err(Error::Input("calibration needs at least one text".into()));
    }
    let tensors = p.params.tensors();
    let linear = |x: &Tensor, name: &str| -> Result<Tensor> {
        let y = x.matmul(&tensors[&format!("{name}.weight")].t()?)?;
        Ok(match tensors.get(&format!("{name}.bias")) {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        })
    };
    let gram = |x: &Tensor| -> Result<Tensor> {
        let x = x.to_dtype(DType::F64)?;
        Ok(x.t()?.matmul(&x)?)
    };
    let mut sums: BTreeMap<String, Tensor> = BTreeMap::new();
    let mut add = |name: String, g: Tensor| -> Result<()> {
        let sum = match sums.remove(&name) {
            Some(s) => (s + g)?,
            None => g,
        };
        sums.insert(name, sum);
        Ok(())
    };
    for chunk in texts.chunks(CALIBRATION_BATCH) {
        let inputs = p
            .model
            .ffn_inputs_packed(&crate::model::Packed::new(chunk)?)?;
        for (i, x) in inputs.iter().enumerate() {
            let FfnSpec::Mlp {
                activation,
                rank: None,
                ..
            } = p.config.layer(i).ffn
            else {
                continue;
            };
            let m = format!("layers.{i}.ffn");
            let up = linear(x, &format!("{m}.up"))?;
            let hidden = match crate::ffn::Pointwise::of(activation) {
                Some(act) => act.apply(&up)?,
                None => (linear(x, &format!("{m}.gate"))?.silu()? * up)?,
            };
            let gx = gram(x)?;
            if tensors.contains_key(&format!("{m}.gate.weight")) {
                add(format!("{m}.gate"), gx.clone())?;
            }
            add(format!("{m}.up"), gx)?;
            add(format!("{m}.down"), gram(&hidden)?)?;
        }
    }
    sums.into_iter()
        .map(|(name, g)| {
            let n = g.dim(0)?;
            let c = g.flatten_all()?.to_vec1::<f64>()?;
            Ok((name, cholesky_damped(&c, n, DAMPING)))
        })
        .collect()
}

#[cfg(test)]
mod tests {

    use super::*;
    use crate::model::ids_tensor;
    use crate::pretrained::{self, native};
    use crate::testutil::fixture;

    fn written(p: &Pretrained, rank: Rank, layers: Layers, tag: &str) -> Pretrained {
        written_with(p, rank, layers, None, tag)
    }

    /// `p` factorised (calibrated on `cal`), written and loaded back.
    fn written_with(
        p: &Pretrained,
        rank: Rank,
        layers: Layers,
        cal: Option<&[Vec<u32>]>,
        tag: &str,
    ) -> Pretrained {
        let (manifest, tensors, _) = lowrank_with(p, rank, layers, cal, None).unwrap();
        let dir = std::env::temp_dir().join(format!("formers-lr-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        native::write(&dir, &manifest, &tensors, &p.dir.join("tokenizer.json")).unwrap();
        let q = pretrained::load(&dir).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        q
    }

    #[test]
    fn full_rank_reproduces_the_model_and_lower_ranks_cost_quality() {
        for name in ["tiny-bert", "tiny-gpt2"] {
            let p = pretrained::load(&fixture(name)).unwrap();
            let x = ids_tensor(&[4, 8, 15, 16, 23, 42]).unwrap();
            let want = p.model.forward(&x, None, None).unwrap();
            let d = p.config.d_model;
            let full = written(&p, Rank::Fixed(d), Layers::All, name);
            assert!(full.unused.is_empty());
            let got = full.model.forward(&x, None, None).unwrap();
            let err = crate::testutil::max_abs(&got, &want);
            // f32 products of factors computed in f64: rounding only.
            assert!(err < 1e-4, "{name}: {err}");
            let low = written(&p, Rank::Fixed(2), Layers::Ffn, name);
            let got = low.model.forward(&x, None, None).unwrap();
            assert!(crate::testutil::max_abs(&got, &want) > 1e-3, "{name}");
        }
    }

    #[test]
    fn bad_ranks_and_layers_are_refused_by_name() {
        let p = pretrained::load(&fixture("tiny-bert")).unwrap();
        let e = |rank, layers| lowrank(&p, rank, layers).unwrap_err().to_string();
        assert!(e(Rank::Fixed(0), Layers::Ffn).contains("at least 1"));
        assert!(e(Rank::Energy(0.0), Layers::Ffn).contains("(0, 1]"));
        assert!(e(Rank::Energy(1.5), Layers::Ffn).contains("(0, 1]"));
        assert!(e(Rank::Energy(f64::NAN), Layers::Ffn).contains("(0, 1]"));
        let big = e(Rank::Fixed(1000), Layers::Ffn);
        assert!(big.contains("larger than `layers.0.ffn.up`"), "{big}");
        // An energy picks, per layer, the rank of the group's most demanding matrix.
        let (_, _, summary) = lowrank(&p, Rank::Energy(0.9), Layers::Ffn).unwrap();
        assert_eq!(summary.len(), p.config.n_layers);
        assert!(summary.iter().all(|(_, r, ..)| *r >= 1 && *r <= 36));
        // Factorising a factorised model is refused.
        let once = written(&p, Rank::Fixed(4), Layers::Ffn, "twice");
        let e = lowrank(&once, Rank::Fixed(2), Layers::Ffn)
            .unwrap_err()
            .to_string();
        assert!(e.contains("layers.0.ffn"), "{e}");
    }

    #[test]
    fn calibration_lowers_the_error_on_the_texts_and_full_rank_stays_exact() {
        let p = pretrained::load(&fixture("tiny-bert")).unwrap();
        let texts: Vec<Vec<u32>> = (0..48u32)
            .map(|i| {
                (0..6 + i % 9)
                    .map(|j| (i * 37 + j * 11) % 299 + 1)
                    .collect()
            })
            .collect();
        let batch = crate::model::Packed::new(&texts).unwrap();
        let want = p.model.hidden_packed(&batch).unwrap();
        let error = |cal: Option<&[Vec<u32>]>, rank: usize| {
            let q = written_with(&p, Rank::Fixed(rank), Layers::Ffn, cal, "calibrated");
            assert!(matches!(q.compression[0], Step::Lowrank { calibration, .. }
                if calibration == cal.map_or(0, <[_]>::len)));
            let got = q.model.hidden_packed(&batch).unwrap();
            crate::testutil::max_abs(&got, &want)
        };
        // At full rank the whitening and its inverse cancel: the model is unchanged.
        assert!(
            error(Some(&texts), 36) < 1e-3,
            "{}",
            error(Some(&texts), 36)
        );
        let (plain, calibrated) = (error(None, 6), error(Some(&texts), 6));
        assert!(
            calibrated < 0.8 * plain,
            "calibrated {calibrated} vs plain {plain}"
        );
        // Calibrating on nothing is refused.
        assert!(lowrank_with(&p, Rank::Fixed(6), Layers::Ffn, Some(&[]), None).is_err());
    }
}

//! The heads on top of the stack (LM, classification, matching, embedding) and pooling.

use candle_core::{Tensor, D};

use crate::config::{HeadSpec, ModelConfig, Pooling};
use crate::kernels::quant::QuantMatrix;
use crate::linear::Linear;
use crate::params::Params;
use crate::{Error, Result};

#[derive(Debug)]
pub(super) enum Head {
    Lm { untied: Option<Linear> },
    Classification { pooling: Pooling, proj: Linear },
    Matching { pooling: Pooling, proj: Linear },
    Embedding { pooling: Pooling, normalize: bool },
}

impl Head {
    /// The head of `cfg` with parameters under `p` (`head.*`).
    pub(super) fn new(cfg: &ModelConfig, p: &Params) -> Result<Self> {
        let (d, vocab) = (cfg.d_model, cfg.input.vocab_size());
        Ok(match &cfg.head {
            HeadSpec::Lm { tied: true, .. } => Head::Lm { untied: None },
            HeadSpec::Lm { tied: false, bias } => Head::Lm {
                untied: Some(Linear::new(&p.pp("head"), d, vocab, *bias)?),
            },
            HeadSpec::Classification { n_classes, pooling } => Head::Classification {
                pooling: *pooling,
                proj: Linear::new(&p.pp("head"), d, *n_classes, true)?,
            },
            HeadSpec::Matching { n_classes, pooling } => Head::Matching {
                pooling: *pooling,
                proj: Linear::new(&p.pp("head"), 4 * d, *n_classes, true)?,
            },
            HeadSpec::Embedding { pooling, normalize } => Head::Embedding {
                pooling: *pooling,
                normalize: *normalize,
            },
        })
    }
}

impl Head {
    /// Applies the head to hidden states `[b, n, d]` (for a matching head: the two documents
    /// of pair `i` in rows `2i`, `2i + 1`); a tied LM head multiplies by the token table
    /// `embed`, or by `embed_quant` when the table is kept quantised.
    pub(super) fn apply(
        &self,
        h: &Tensor,
        mask: Option<&Tensor>,
        embed: &Tensor,
        embed_quant: Option<&QuantMatrix>,
    ) -> Result<Tensor> {
        match self {
            Head::Lm { untied: None } => {
                let (b, n, d) = h.dims3()?;
                let h = h.reshape((b * n, d))?;
                let logits = match embed_quant {
                    Some(q) => crate::linear::quant_forward(q, None, &h)?,
                    None => h.matmul(&embed.t()?)?,
                };
                Ok(logits.reshape((b, n, ()))?)
            }
            Head::Lm { untied: Some(l) } => l.forward(h),
            Head::Classification { pooling, proj } => proj.forward(&pool(h, mask, *pooling)?),
            Head::Matching { pooling, proj } => {
                let pooled = pool(h, mask, *pooling)?;
                let (rows, d) = pooled.dims2()?;
                if !rows.is_multiple_of(2) {
                    return Err(Error::Input(format!(
                        "a matching head pools documents in pairs: {rows} rows is odd"
                    )));
                }
                // Rows 2i and 2i + 1 are the two documents of pair i.
                let pairs = pooled.reshape((rows / 2, 2, d))?;
                let u = pairs.narrow(1, 0, 1)?.squeeze(1)?;
                let v = pairs.narrow(1, 1, 1)?.squeeze(1)?;
                let features = Tensor::cat(&[&u, &v, &(&u * &v)?, &(&u - &v)?.abs()?], 1)?;
                proj.forward(&features)
            }
            Head::Embedding { pooling, normalize } => {
                let pooled = pool(h, mask, *pooling)?;
                if !normalize {
                    return Ok(pooled);
                }
                // As torch.nn.functional.normalize: x / max(||x||, 1e-12).
                let norm = pooled
                    .sqr()?
                    .sum_keepdim(D::Minus1)?
                    .sqrt()?
                    .clamp(1e-12, f64::MAX)?;
                Ok(pooled.broadcast_div(&norm)?)
            }
        }
    }
}

/// One vector per sequence of `h [b, n, d]`.
fn pool(h: &Tensor, mask: Option<&Tensor>, pooling: Pooling) -> Result<Tensor> {
    match pooling {
        Pooling::Mean => mean_pool(h, mask),
        Pooling::First => Ok(h.narrow(1, 0, 1)?.squeeze(1)?),
    }
}

/// Mean of `h [b, n, d]` over the positions where `mask [b, n]` is 1.
pub fn mean_pool(h: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
    match mask {
        None => Ok(h.mean(1)?),
        Some(m) => {
            let m = m.to_dtype(h.dtype())?.unsqueeze(D::Minus1)?;
            let sum = h.broadcast_mul(&m)?.sum(1)?;
            let count = m.sum(1)?.clamp(1e-9, f64::MAX)?;
            Ok(sum.broadcast_div(&count)?)
        }
    }
}

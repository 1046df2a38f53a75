//! Losses and accuracy from logits, with a per-target weight so padding can be ignored.

use candle_core::{DType, Tensor, D};

use crate::{kernels, Result};

/// Log-softmax over the last dimension from differentiable ops.
pub fn log_softmax(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let shifted = x.broadcast_sub(&max)?;
    let lse = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    Ok(shifted.broadcast_sub(&lse)?)
}

/// Mean cross-entropy of `logits [.., c]` against `targets [..]` (u32); `weights [..]`
/// (same dtype as logits) select which targets count. f32 on the CPU takes the fused op
/// ([`kernels::cross_entropy`]); otherwise, and as its reference, [`cross_entropy_composed`].
pub fn cross_entropy(
    logits: &Tensor,
    targets: &Tensor,
    weights: Option<&Tensor>,
) -> Result<Tensor> {
    let c = logits.dim(D::Minus1)?;
    let logits = logits.reshape(((), c))?;
    let targets = targets.flatten_all()?;
    if kernels::cross_entropy::supports(&logits) {
        let weights = weights.map(Tensor::flatten_all).transpose()?;
        return kernels::cross_entropy::cross_entropy(&logits, &targets, weights.as_ref());
    }
    cross_entropy_composed(&logits, &targets, weights)
}

/// [`cross_entropy`] from differentiable candle ops: log-softmax, gather, weighted mean.
pub fn cross_entropy_composed(
    logits: &Tensor,
    targets: &Tensor,
    weights: Option<&Tensor>,
) -> Result<Tensor> {
    let c = logits.dim(D::Minus1)?;
    let logits = logits.reshape(((), c))?;
    let targets = targets.flatten_all()?;
    let logp = log_softmax(&logits)?;
    let picked = logp.gather(&targets.unsqueeze(1)?, 1)?.squeeze(1)?;
    let loss = match weights {
        Some(w) => {
            let w = w.flatten_all()?.to_dtype(picked.dtype())?;
            let total = w.sum_all()?;
            (picked * &w)?.sum_all()?.neg()?.broadcast_div(&total)?
        }
        None => picked.mean_all()?.neg()?,
    };
    Ok(loss)
}

/// (correct, counted) argmax predictions over the targets that `weights` select.
pub fn accuracy(
    logits: &Tensor,
    targets: &Tensor,
    weights: Option<&Tensor>,
) -> Result<(usize, usize)> {
    let pred = logits.argmax(D::Minus1)?.flatten_all()?.to_vec1::<u32>()?;
    let tgt = targets.flatten_all()?.to_vec1::<u32>()?;
    let w: Vec<f32> = match weights {
        Some(w) => w.flatten_all()?.to_dtype(DType::F32)?.to_vec1()?,
        None => vec![1.0; tgt.len()],
    };
    let mut correct = 0;
    let mut counted = 0;
    for ((p, t), w) in pred.iter().zip(&tgt).zip(&w) {
        if *w > 0.0 {
            counted += 1;
            correct += usize::from(p == t);
        }
    }
    Ok((correct, counted))
}

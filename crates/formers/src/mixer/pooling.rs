//! Pooling token mixer (PoolFormer, Yu et al. 2022, "MetaFormer Is Actually What You Need
//! for Vision"): `avg_pool(x) − x` over a window of positions, ignoring padding. No
//! parameters; O(n·window).

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use super::kind::{Capabilities, MixCtx, Mixed, MixerCache, MixerDims, MixerKind, TokenMixer, per_segment, positive, single};
use crate::params::Params;
use crate::{Error, Result};

/// Config of the pooling mixer.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PoolSpec {
    /// Positions averaged: centred (odd) in an encoder, the last `window` in a decoder.
    #[serde(default = "default_window")]
    pub window: usize,
}

fn default_window() -> usize {
    3
}

impl PoolSpec {
    /// The spec tests sweep over.
    pub fn example() -> Self {
        PoolSpec { window: 3 }
    }
}

impl MixerKind for PoolSpec {
    fn name(&self) -> &'static str {
        "pool"
    }

    /// The last `window − 1` inputs.
    fn cache_values(&self, dims: &MixerDims, n: usize) -> u128 {
        (self.window.saturating_sub(1).min(n) as u128).saturating_mul(dims.d_model as u128)
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            causal: true,
            alibi: false,
            rope: false,
        }
    }

    fn validate(&self, at: &str, dims: &MixerDims) -> Result<()> {
        positive(at, &[("window", self.window)])?;
        if !dims.causal && self.window.is_multiple_of(2) {
            return Err(Error::config(
                format!("{at}.window"),
                format!("a centred pooling window must be odd, found {}", self.window),
            ));
        }
        Ok(())
    }

    fn build(&self, dims: &MixerDims, _p: &Params) -> Result<Box<dyn TokenMixer>> {
        Ok(Box::new(Pool {
            window: self.window,
            causal: dims.causal,
        }))
    }

    fn flops_per_token(&self, dims: &MixerDims, _n: usize) -> f64 {
        self.window as f64 * dims.d_model as f64
    }

    fn param_count(&self, _dims: &MixerDims) -> u128 {
        0
    }

    fn saved_per_token(&self, dims: &MixerDims, _n: usize) -> u128 {
        2 * dims.d_model as u128
    }
}

/// Average pooling over `window` positions (centred, or the `window` last ones if causal).
#[derive(Debug, Clone)]
pub struct Pool {
    pub window: usize,
    pub causal: bool,
}

impl Pool {
    fn pool(&self, x: &Tensor, keep: Option<&Tensor>) -> Result<Tensor> {
        let (before, after) = if self.causal {
            (self.window - 1, 0)
        } else {
            (self.window / 2, self.window / 2)
        };
        let ones;
        let keep = match keep {
            Some(k) => k,
            None => {
                let (b, n, _) = x.dims3()?;
                ones = Tensor::ones((b, n, 1), x.dtype(), x.device())?;
                &ones
            }
        };
        let xm = x.broadcast_mul(keep)?;
        let mut sum = xm.clone();
        let mut count = keep.clone();
        for o in (1..=before)
            .map(|o| -(o as isize))
            .chain((1..=after).map(|o| o as isize))
        {
            sum = (sum + shift(&xm, o)?)?;
            count = (count + shift(keep, o)?)?;
        }
        let mean = sum.broadcast_div(&count.clamp(1.0, f64::MAX)?)?;
        Ok((mean - x)?)
    }
}

impl Pool {
    /// Causal pooling of `x`, which continues the inputs the cache holds (the last
    /// `window − 1` of them).
    fn decode(&self, x: &Tensor, ctx: &MixCtx, cache: &mut MixerCache) -> Result<Tensor> {
        if !self.causal {
            return Err(super::kind::no_cache("centred pooling"));
        }
        super::kind::no_padding_in_cache(ctx.key_bias)?;
        let n = x.dim(1)?;
        let all = match cache.tensors.as_slice() {
            [held] => Tensor::cat(&[held, x], 1)?,
            _ => x.clone(),
        };
        let m = all.dim(1)?;
        let kept = (self.window - 1).min(m);
        cache.tensors = vec![all.narrow(1, m - kept, kept)?];
        Ok(self.pool(&all, None)?.narrow(1, m - n, n)?)
    }
}

/// `y[i] = x[i + o]` along dim 1, zero where `i + o` is outside.
fn shift(x: &Tensor, o: isize) -> Result<Tensor> {
    let n = x.dim(1)?;
    let k = o.unsigned_abs();
    if k >= n {
        return Ok(x.zeros_like()?);
    }
    let mut pad_shape = x.dims().to_vec();
    pad_shape[1] = k;
    let zeros = Tensor::zeros(pad_shape, x.dtype(), x.device())?;
    Ok(if o > 0 {
        Tensor::cat(&[&x.narrow(1, k, n - k)?, &zeros], 1)?
    } else {
        Tensor::cat(&[&zeros, &x.narrow(1, 0, n - k)?], 1)?
    })
}

impl TokenMixer for Pool {
    fn mix(&self, x: &Tensor, ctx: &MixCtx, caches: &mut [&mut MixerCache]) -> Result<Mixed> {
        let y = match ctx.segments {
            Some(segments) => {
                let parts = per_segment(segments, ctx, caches, |s, ctx, cache| {
                    let x = x.narrow(1, s.start, s.len)?;
                    match cache {
                        Some(cache) => self.decode(&x, ctx, cache),
                        None => self.pool(&x, None),
                    }
                })?;
                Tensor::cat(&parts, 1)?
            }
            None => match single(caches)? {
                Some(cache) => self.decode(x, ctx, cache)?,
                None => {
                    let keep = match ctx.key_bias {
                        Some(kb) => {
                            let (b, _, _, n) = kb.dims4()?;
                            Some(kb.ge(-1.0)?.to_dtype(x.dtype())?.reshape((b, n, 1))?)
                        }
                        None => None,
                    };
                    self.pool(x, keep.as_ref())?
                }
            },
        };
        Ok(Mixed { y, values: None })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{check_grad, randn};
    use candle_core::{DType, Device};

    #[test]
    fn equals_a_loop_over_windows() {
        let x = randn(&[2, 7, 3], 1);
        let xv = x.to_vec3::<f64>().unwrap();
        for (window, causal) in [(3, false), (5, false), (3, true), (1, false)] {
            let y = Pool { window, causal }
                .forward(&x, &MixCtx::default(), None)
                .unwrap()
                .to_vec3::<f64>()
                .unwrap();
            for b in 0..2 {
                for i in 0..7isize {
                    let (lo, hi) = if causal {
                        (i - window as isize + 1, i)
                    } else {
                        (i - window as isize / 2, i + window as isize / 2)
                    };
                    let js: Vec<usize> = (lo..=hi)
                        .filter(|&j| (0..7).contains(&j))
                        .map(|j| j as usize)
                        .collect();
                    for c in 0..3 {
                        let mean = js.iter().map(|&j| xv[b][j][c]).sum::<f64>() / js.len() as f64;
                        assert!(
                            (y[b][i as usize][c] - (mean - xv[b][i as usize][c])).abs() < 1e-12
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn gradient_matches_finite_differences() {
        let p = crate::params::Params::new(0, DType::F64, &Device::Cpu);
        let pool = Pool {
            window: 3,
            causal: false,
        };
        check_grad(&p, &randn(&[1, 5, 2], 2), |x| {
            pool.forward(x, &MixCtx::default(), None)
        });
    }
}

//! Position schemes: learned and sinusoidal tables added to the embeddings, and rotary
//! embeddings applied to queries and keys (RoFormer, Su et al. 2021), in one or two
//! dimensions.

use candle_core::{DType, Device, Tensor, D};

use serde::{Deserialize, Serialize};

use crate::params::{Init, Params};
use crate::{Error, Result};

/// Position scheme.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum PositionSpec {
    /// A learned table added to the embeddings (BERT, GPT-2).
    #[default]
    Learned,
    /// Fixed sinusoids added to the embeddings (Vaswani et al. 2017).
    Sinusoidal,
    /// Linear distance penalties on attention scores, one slope per head (ALiBi, Press et
    /// al. 2022, "Train Short, Test Long").
    Alibi,
    /// Rotary embeddings applied to queries and keys (RoFormer, Su et al. 2021).
    Rope {
        #[serde(default = "default_rope_base")]
        base: f64,
    },
    /// Rotary embeddings over a `width`-wide grid read row by row: half of each rotated
    /// pair turns with the row, half with the column (2-D RoPE as in ViTs, Heo et al. 2024,
    /// "Rotary Position Embedding for Vision Transformer").
    Rope2d {
        width: usize,
        #[serde(default = "default_rope_base")]
        base: f64,
    },
    /// No positional information.
    None,
}

fn default_rope_base() -> f64 {
    10_000.0
}

/// The sizes a position scheme is built for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PositionDims {
    /// Longest sequence (rows of a table).
    pub max_len: usize,
    /// Width of the residual stream.
    pub d_model: usize,
    /// Attention heads (ALiBi slopes; `d_model / n_heads` is the rotated head size).
    pub n_heads: usize,
}

impl PositionDims {
    fn head_dim(&self) -> usize {
        self.d_model / self.n_heads
    }
}

/// How a model knows where each token is.
#[derive(Debug, Clone)]
pub enum Positions {
    /// A table `[max_len, d]` added to the embeddings (learned or fixed sinusoids).
    Table(Tensor),
    /// Rotations of query/key pairs; nothing is added to the embeddings.
    Rope(Rope),
    /// ALiBi slopes `[heads]`; attention subtracts `slope · distance` from its scores.
    Alibi(Tensor),
    /// No positional information.
    None,
}

impl Positions {
    /// The scheme `spec` for a model of `dims`; a learned table is the parameter `weight`
    /// under `p`.
    pub fn new(spec: &PositionSpec, dims: PositionDims, p: &Params) -> Result<Self> {
        let (len, d) = (dims.max_len, dims.d_model);
        Ok(match *spec {
            PositionSpec::Learned => {
                Positions::Table(p.get(&[len, d], "weight", Init::Embedding)?)
            }
            PositionSpec::Sinusoidal => Positions::Table(sinusoids(len, d, p.dtype(), p.device())?),
            PositionSpec::Rope { base } => Positions::Rope(Rope::new(
                len,
                dims.head_dim(),
                base,
                p.dtype(),
                p.device(),
            )?),
            PositionSpec::Rope2d { width, base } => Positions::Rope(Rope::new_2d(
                len,
                width,
                dims.head_dim(),
                base,
                p.dtype(),
                p.device(),
            )?),
            PositionSpec::Alibi => Positions::Alibi(
                Tensor::from_vec(alibi_slopes(dims.n_heads), dims.n_heads, p.device())?
                    .to_dtype(p.dtype())?,
            ),
            PositionSpec::None => Positions::None,
        })
    }

    /// `(parameters, other stored values)` of the scheme `spec` for `dims`, as
    /// [`Positions::new`] makes them (saturating; for memory bounds).
    pub fn sizes(spec: &PositionSpec, dims: PositionDims) -> (u128, u128) {
        let table = (dims.max_len as u128).saturating_mul(dims.d_model as u128);
        match spec {
            PositionSpec::Learned => (table, 0),
            PositionSpec::Sinusoidal => (0, table),
            PositionSpec::Rope { .. } | PositionSpec::Rope2d { .. } => (
                0,
                (dims.max_len as u128).saturating_mul(dims.head_dim() as u128),
            ),
            PositionSpec::Alibi => (0, dims.n_heads as u128),
            PositionSpec::None => (0, 0),
        }
    }

    /// Adds positions `offset..offset + n` to `x [b, n, d]` (tables only).
    pub fn add(&self, x: &Tensor, offset: usize) -> Result<Tensor> {
        match self {
            Positions::Table(t) => {
                let n = x.dim(1)?;
                check_len(offset + n, t.dim(0)?)?;
                Ok(crate::kernels::bias::add(x, &t.narrow(0, offset, n)?)?)
            }
            _ => Ok(x.clone()),
        }
    }

    /// Adds the positions `pos [t]` (u32) to `x [t, d]` (tables only; packed batches).
    pub fn add_at(&self, x: &Tensor, pos: &Tensor) -> Result<Tensor> {
        match self {
            Positions::Table(t) => {
                let max = pos.max_all()?.to_scalar::<u32>()? as usize;
                check_len(max + 1, t.dim(0)?)?;
                Ok((x + t.index_select(pos, 0)?)?)
            }
            _ => Ok(x.clone()),
        }
    }

    /// The ALiBi slopes, when this scheme biases attention scores.
    pub fn alibi(&self) -> Option<&Tensor> {
        match self {
            Positions::Alibi(s) => Some(s),
            _ => None,
        }
    }

    /// The rotary tables, when this scheme rotates queries and keys.
    pub fn rope(&self) -> Option<&Rope> {
        match self {
            Positions::Rope(r) => Some(r),
            _ => None,
        }
    }
}

/// ALiBi's head slopes: the geometric sequence `2^(-8/n), 2^(-16/n), ...` for a power of
/// two `n`; otherwise those of the next lower power of two, then every other slope of the
/// next higher one (as in the paper's reference code).
pub fn alibi_slopes(n: usize) -> Vec<f64> {
    let pow2 = |n: usize| -> Vec<f64> {
        let start = 2f64.powf(-8.0 / n as f64);
        (1..=n).map(|i| start.powi(i as i32)).collect()
    };
    if n.is_power_of_two() {
        return pow2(n);
    }
    let lower = 1 << (usize::BITS - 1 - n.leading_zeros());
    let mut s = pow2(lower);
    s.extend(pow2(2 * lower).into_iter().step_by(2).take(n - lower));
    s
}

/// `[h, ql, kl]`: `-slope_h · |q_first + i − (k_first + j)|` (ALiBi scores penalty).
pub fn alibi_bias(
    slopes: &Tensor,
    q_first: usize,
    ql: usize,
    k_first: usize,
    kl: usize,
    like: &Tensor,
) -> Result<Tensor> {
    let q: Vec<usize> = (q_first..q_first + ql).collect();
    let k: Vec<usize> = (k_first..k_first + kl).collect();
    alibi_bias_at(slopes, &q, &k, like)
}

/// `[h, queries, keys]`: ALiBi's penalty between queries and keys at these positions.
pub fn alibi_bias_at(slopes: &Tensor, q: &[usize], k: &[usize], like: &Tensor) -> Result<Tensor> {
    let dist: Vec<f64> = q
        .iter()
        .flat_map(|&i| k.iter().map(move |&j| -(i.abs_diff(j) as f64)))
        .collect();
    let dist =
        Tensor::from_vec(dist, (1, q.len(), k.len()), like.device())?.to_dtype(like.dtype())?;
    let h = slopes.dim(0)?;
    Ok(slopes
        .to_dtype(like.dtype())?
        .reshape((h, 1, 1))?
        .broadcast_mul(&dist)?)
}

fn check_len(needed: usize, max_len: usize) -> Result<()> {
    if needed > max_len {
        return Err(Error::Input(format!(
            "sequence of {needed} positions is longer than the model's max_len {max_len}"
        )));
    }
    Ok(())
}

/// `PE[pos, 2i] = sin(pos / 10000^(2i/d))`, `PE[pos, 2i+1] = cos(...)` (Vaswani et al. 2017).
fn sinusoids(len: usize, d: usize, dtype: DType, device: &Device) -> Result<Tensor> {
    let mut v = vec![0f64; len * d];
    for pos in 0..len {
        for i in 0..d {
            let freq = 10_000f64.powf(-((i / 2 * 2) as f64) / d as f64);
            let a = pos as f64 * freq;
            v[pos * d + i] = if i % 2 == 0 { a.sin() } else { a.cos() };
        }
    }
    Ok(Tensor::from_vec(v, (len, d), device)?.to_dtype(dtype)?)
}

/// Rotary tables `cos, sin : [max_len, head_dim / 2]` in the rotate-half layout.
#[derive(Debug, Clone)]
pub struct Rope {
    cos: Tensor,
    sin: Tensor,
}

impl Rope {
    /// Tables for `max_len` positions of a `head_dim`-wide head: pair `i` turns by
    /// `pos · base^(-2i/head_dim)`.
    pub fn new(
        max_len: usize,
        head_dim: usize,
        base: f64,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let freq = |i: usize| base.powf(-((2 * i) as f64) / head_dim as f64);
        Self::tables(max_len, head_dim / 2, dtype, device, |pos, i| {
            pos as f64 * freq(i)
        })
    }

    /// Tables for a grid `width` positions wide, read row by row: of the `head_dim / 2`
    /// pairs, the first half turn with the row `pos / width` and the second half with the
    /// column `pos % width`, pair `i` of each half by `base^(-4i/head_dim)` per step.
    pub fn new_2d(
        max_len: usize,
        width: usize,
        head_dim: usize,
        base: f64,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let quarter = head_dim / 4;
        let freq = |i: usize| base.powf(-((4 * i) as f64) / head_dim as f64);
        Self::tables(max_len, 2 * quarter, dtype, device, |pos, i| {
            if i < quarter {
                (pos / width) as f64 * freq(i)
            } else {
                (pos % width) as f64 * freq(i - quarter)
            }
        })
    }

    fn tables(
        max_len: usize,
        half: usize,
        dtype: DType,
        device: &Device,
        angle: impl Fn(usize, usize) -> f64,
    ) -> Result<Self> {
        let mut cos = vec![0f64; max_len * half];
        let mut sin = vec![0f64; max_len * half];
        for pos in 0..max_len {
            for i in 0..half {
                let a = angle(pos, i);
                cos[pos * half + i] = a.cos();
                sin[pos * half + i] = a.sin();
            }
        }
        Ok(Rope {
            cos: Tensor::from_vec(cos, (max_len, half), device)?.to_dtype(dtype)?,
            sin: Tensor::from_vec(sin, (max_len, half), device)?.to_dtype(dtype)?,
        })
    }

    /// Rotates `x [b, h, n, head_dim]` holding positions `offset..offset + n`.
    pub fn apply(&self, x: &Tensor, offset: usize) -> Result<Tensor> {
        let n = x.dim(2)?;
        check_len(offset + n, self.cos.dim(0)?)?;
        let half = x.dim(D::Minus1)? / 2;
        let cos = self.cos.narrow(0, offset, n)?.to_dtype(x.dtype())?;
        let sin = self.sin.narrow(0, offset, n)?.to_dtype(x.dtype())?;
        let x1 = x.narrow(D::Minus1, 0, half)?;
        let x2 = x.narrow(D::Minus1, half, half)?;
        let r1 = (x1.broadcast_mul(&cos)? - x2.broadcast_mul(&sin)?)?;
        let r2 = (x2.broadcast_mul(&cos)? + x1.broadcast_mul(&sin)?)?;
        Ok(Tensor::cat(&[r1, r2], D::Minus1)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{check_grad, randn};

    #[test]
    fn rope_preserves_norms_and_depends_on_relative_position() {
        let rope = Rope::new(32, 8, 10_000.0, DType::F64, &Device::Cpu).unwrap();
        let q = randn(&[1, 1, 1, 8], 1);
        let k = randn(&[1, 1, 1, 8], 2);
        let dot = |a: usize, b: usize| {
            sum(&(rope.apply(&q, a).unwrap() * rope.apply(&k, b).unwrap()).unwrap())
        };
        assert!((dot(3, 1) - dot(10, 8)).abs() < 1e-10);
        assert!((dot(3, 1) - dot(3, 2)).abs() > 1e-6);
        let n1 = sum(&rope.apply(&q, 5).unwrap().sqr().unwrap());
        assert!((sum(&q.sqr().unwrap()) - n1).abs() < 1e-10);
    }

    fn sum(t: &Tensor) -> f64 {
        t.sum_all().unwrap().to_scalar::<f64>().unwrap()
    }

    #[test]
    fn rope_2d_depends_on_the_row_and_column_offsets() {
        // A 5-wide grid: position = 5 · row + column.
        let rope = Rope::new_2d(25, 5, 8, 10.0, DType::F64, &Device::Cpu).unwrap();
        let q = randn(&[1, 1, 1, 8], 1);
        let k = randn(&[1, 1, 1, 8], 2);
        let at = |row: usize, col: usize| 5 * row + col;
        let dot = |a: usize, b: usize| {
            sum(&(rope.apply(&q, a).unwrap() * rope.apply(&k, b).unwrap()).unwrap())
        };
        // The same (Δrow, Δcol) anywhere on the grid gives the same score ...
        let base = dot(at(1, 1), at(2, 3));
        assert!((base - dot(at(2, 0), at(3, 2))).abs() < 1e-10);
        assert!((base - dot(at(0, 2), at(1, 4))).abs() < 1e-10);
        // ... but a neighbour one row down is not the next position along the sequence:
        // 1-D rotary would score (0, 4) → (1, 0) as one step, here it is (+1, −4).
        assert!((dot(at(0, 4), at(1, 0)) - dot(at(0, 0), at(0, 1))).abs() > 1e-6);
        assert!((dot(at(0, 0), at(1, 0)) - dot(at(2, 3), at(3, 3))).abs() < 1e-10);
        // Rows and columns turn different pairs: a row step is not a column step.
        assert!((dot(at(0, 0), at(1, 0)) - dot(at(0, 0), at(0, 1))).abs() > 1e-6);
        // Still a rotation: norms are kept.
        let n0 = sum(&q.sqr().unwrap());
        let n1 = sum(&rope.apply(&q, at(3, 2)).unwrap().sqr().unwrap());
        assert!((n0 - n1).abs() < 1e-10);
    }

    #[test]
    fn rope_gradient_matches_finite_differences() {
        let rope = Rope::new(16, 4, 10_000.0, DType::F64, &Device::Cpu).unwrap();
        let p = Params::new(0, DType::F64, &Device::Cpu);
        check_grad(&p, &randn(&[1, 2, 5, 4], 3), |x| rope.apply(x, 2));
    }

    #[test]
    fn alibi_slopes_follow_the_paper() {
        let s8 = alibi_slopes(8);
        assert!((s8[0] - 0.5).abs() < 1e-12 && (s8[7] - 1.0 / 256.0).abs() < 1e-12);
        let s6 = alibi_slopes(6);
        assert_eq!(s6.len(), 6);
        assert_eq!(&s6[..4], alibi_slopes(4).as_slice());
        assert_eq!(s6[4], alibi_slopes(8)[0]);
        assert_eq!(s6[5], alibi_slopes(8)[2]);
    }

    #[test]
    fn too_long_input_is_an_error() {
        let rope = Rope::new(4, 4, 10_000.0, DType::F64, &Device::Cpu).unwrap();
        let e = rope.apply(&randn(&[1, 1, 5, 4], 3), 0).unwrap_err();
        assert!(e.to_string().contains("max_len 4"), "{e}");
    }
}

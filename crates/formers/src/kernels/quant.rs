//! A weight matrix stored quantised: per-row int8 ([`super::int8`]) or in blocks of 32
//! ([`super::blockq`]); what a linear layer loaded from a `formers compress quantize`
//! checkpoint multiplies by.

use super::blockq::BlockMatrix;
use super::int8::Int8Matrix;

/// A quantised `[rows (= out), cols (= in)]` matrix.
#[derive(Debug, Clone, PartialEq)]
pub enum QuantMatrix {
    /// One scale per row.
    Int8(Int8Matrix),
    /// One scale per block of 32 values of a row (Q8_0, Q4_0).
    Block(BlockMatrix),
}

impl QuantMatrix {
    /// Output rows.
    pub fn rows(&self) -> usize {
        match self {
            QuantMatrix::Int8(q) => q.rows,
            QuantMatrix::Block(q) => q.rows,
        }
    }

    /// Input columns.
    pub fn cols(&self) -> usize {
        match self {
            QuantMatrix::Int8(q) => q.cols,
            QuantMatrix::Block(q) => q.cols,
        }
    }

    /// The scheme's name (`int8`, `q8_0`, `q4_0`).
    pub fn scheme(&self) -> &'static str {
        match self {
            QuantMatrix::Int8(_) => "int8",
            QuantMatrix::Block(q) => q.kind.name(),
        }
    }

    /// Row-major f32 values.
    pub fn dequantize(&self) -> Vec<f32> {
        match self {
            QuantMatrix::Int8(q) => q.dequantize(),
            QuantMatrix::Block(q) => q.dequantize(),
        }
    }

    /// Row `r`'s f32 values (a table lookup).
    pub fn dequantize_row(&self, r: usize) -> Vec<f32> {
        match self {
            QuantMatrix::Int8(q) => {
                let s = q.scales[r];
                q.data[r * q.cols..(r + 1) * q.cols]
                    .iter()
                    .map(|&c| s * c as f32)
                    .collect()
            }
            QuantMatrix::Block(q) => q.dequantize_row(r),
        }
    }

    /// Bytes of codes and scales.
    pub fn bytes(&self) -> usize {
        match self {
            QuantMatrix::Int8(q) => q.data.len() + 4 * q.scales.len(),
            QuantMatrix::Block(q) => q.codes.len() + 4 * q.scales.len(),
        }
    }

    /// `out[m, rows] = x[m, cols] · Wᵀ (+ bias)`, in integers (see each kind's `matmul`).
    pub fn matmul(&self, x: &[f32], m: usize, bias: Option<&[f32]>, out: &mut [f32]) {
        match self {
            QuantMatrix::Int8(q) => q.matmul(x, m, bias, out),
            QuantMatrix::Block(q) => q.matmul(x, m, bias, out),
        }
    }
}

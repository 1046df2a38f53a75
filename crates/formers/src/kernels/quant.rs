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

/// Bytes of W one task's block of rows is cut to: it stays in L1 while rows of x stream
/// past (both integer kernels).
pub(super) const W_BLOCK_BYTES: usize = 16 << 10;

/// Rows of W per task for rows of `row_bytes`: as many as fit [`W_BLOCK_BYTES`], a multiple
/// of the tile's `c` rows, at least `c`, at most `n` rounded up to `c`.
pub(super) fn w_block_rows(row_bytes: usize, c: usize, n: usize) -> usize {
    (W_BLOCK_BYTES / row_bytes.max(1) / c * c)
        .max(c)
        .min(n.next_multiple_of(c))
}

/// Runs `task(w_rows, x_rows)` on every block of the grid that cuts `n` rows of W into
/// blocks of `w_block` and `mp` rows of x into blocks of `x_block`: on the rayon pool when
/// there is more than one block, else on this thread. Tasks write disjoint parts of the
/// output (the rows of x × the rows of W they are given).
pub(super) fn for_each_block(
    n: usize,
    w_block: usize,
    mp: usize,
    x_block: usize,
    task: impl Fn(std::ops::Range<usize>, std::ops::Range<usize>) + Sync,
) {
    use rayon::prelude::*;
    let (w_blocks, x_blocks) = (n.div_ceil(w_block), mp.div_ceil(x_block));
    let run = |t: usize| {
        let (wb, xb) = (t / x_blocks, t % x_blocks);
        task(
            wb * w_block..((wb + 1) * w_block).min(n),
            xb * x_block..((xb + 1) * x_block).min(mp),
        )
    };
    match w_blocks * x_blocks {
        1 => run(0),
        tasks => (0..tasks).into_par_iter().for_each(run),
    }
}

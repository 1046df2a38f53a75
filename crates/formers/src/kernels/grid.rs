//! The task grid both integer matmuls (`int8`, `blockq`) run on: blocks of W rows ×
//! blocks of x rows, on the rayon pool when there is more than one.

/// Bytes of W one task's block of rows is cut to: it stays in L1 while rows of x stream
/// past (both integer kernels).
pub(crate) const W_BLOCK_BYTES: usize = 16 << 10;

/// Rows of W per task for rows of `row_bytes`: as many as fit [`W_BLOCK_BYTES`], a multiple
/// of the tile's `c` rows, at least `c`, at most `n` rounded up to `c`.
pub(crate) fn w_block_rows(row_bytes: usize, c: usize, n: usize) -> usize {
    (W_BLOCK_BYTES / row_bytes.max(1) / c * c)
        .max(c)
        .min(n.next_multiple_of(c))
}

/// Runs `task(w_rows, x_rows)` on every block of the grid that cuts `n` rows of W into
/// blocks of `w_block` and `mp` rows of x into blocks of `x_block`: on the rayon pool when
/// there is more than one block, else on this thread. Tasks write disjoint parts of the
/// output (the rows of x × the rows of W they are given).
pub(crate) fn for_each_block(
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

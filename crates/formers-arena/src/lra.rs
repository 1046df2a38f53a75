//! Reference numbers from the Long Range Arena paper (Tay et al., "Long Range Arena: A Benchmark
//! for Efficient Transformers", ICLR 2021). They are quoted, not produced by formers.
//!
//! Checked against the paper's Table 1 and Table 2 (two independent transcriptions of the
//! ICLR 2021 / arXiv 2011.04006 text) and, for Table 1, against the leaderboard in the README of
//! <https://github.com/google-research/long-range-arena>. Values are as printed, including the
//! paper's rounding; see the notes on [`TABLE1`] and [`TABLE2`] for two printed oddities.

/// One row of LRA Table 1 (test accuracy, %, "full" setting: the paper's models and budgets).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Table1Row {
    /// Model name as printed in the paper.
    pub model: &'static str,
    pub listops: f64,
    pub text: f64,
    pub retrieval: f64,
    pub image: f64,
    pub pathfinder: f64,
    /// `None` = "FAIL" (no model learned Path-X).
    pub path_x: Option<f64>,
    /// The printed average over the five tasks other than Path-X.
    pub avg: f64,
}

impl Table1Row {
    /// The five accuracies in LRA column order, then Path-X.
    pub fn tasks(&self) -> [Option<f64>; 6] {
        [
            Some(self.listops),
            Some(self.text),
            Some(self.retrieval),
            Some(self.image),
            Some(self.pathfinder),
            self.path_x,
        ]
    }
}

const fn t1(model: &'static str, acc: [f64; 5], avg: f64) -> Table1Row {
    Table1Row {
        model,
        listops: acc[0],
        text: acc[1],
        retrieval: acc[2],
        image: acc[3],
        pathfinder: acc[4],
        path_x: None,
        avg,
    }
}

/// LRA paper, Table 1: "Experimental results on Long-Range Arena benchmark" (accuracy %, Path-X
/// FAIL for every model; Avg excludes Path-X).
///
/// Note: the paper prints 51.39 as Sinkhorn Trans.'s average, while the mean of its five printed
/// accuracies is 51.48 and the repository README's leaderboard prints 51.29; we keep the paper's
/// printed value.
pub const TABLE1: [Table1Row; 11] = [
    t1("Transformer", [36.37, 64.27, 57.46, 42.44, 71.40], 54.39),
    t1(
        "Local Attention",
        [15.82, 52.98, 53.39, 41.46, 66.63],
        46.06,
    ),
    t1("Sparse Trans.", [17.07, 63.58, 59.59, 44.24, 71.71], 51.24),
    t1("Longformer", [35.63, 62.85, 56.89, 42.22, 69.71], 53.46),
    t1("Linformer", [35.70, 53.94, 52.27, 38.56, 76.34], 51.36),
    t1("Reformer", [37.27, 56.10, 53.40, 38.07, 68.50], 50.67),
    t1(
        "Sinkhorn Trans.",
        [33.67, 61.20, 53.83, 41.23, 67.45],
        51.39,
    ),
    t1("Synthesizer", [36.99, 61.68, 54.67, 41.61, 69.45], 52.88),
    t1("BigBird", [36.05, 64.02, 59.29, 40.83, 74.87], 55.01),
    t1("Linear Trans.", [16.13, 65.90, 53.09, 42.34, 75.30], 50.55),
    t1("Performer", [18.01, 65.40, 53.82, 42.77, 77.05], 51.41),
];

/// Sequence lengths of LRA Table 2.
pub const TABLE2_LENGTHS: [usize; 4] = [1024, 2048, 3072, 4096];

/// One row of LRA Table 2 (byte-level text classification, batch 32, 4x4 TPU v3).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Table2Row {
    /// Model name as printed in the paper.
    pub model: &'static str,
    /// Training steps per second at 1K, 2K, 3K, 4K.
    pub steps_per_s: [f64; 4],
    /// Speed relative to the Transformer as printed in brackets (`None` for the Transformer).
    pub speedup: Option<[f64; 4]>,
    /// Peak memory per TPU device, GB, at 1K, 2K, 3K, 4K.
    pub peak_memory_gb: [f64; 4],
}

const fn t2(model: &'static str, steps: [f64; 4], up: [f64; 4], mem: [f64; 4]) -> Table2Row {
    Table2Row {
        model,
        steps_per_s: steps,
        speedup: Some(up),
        peak_memory_gb: mem,
    }
}

/// LRA paper, Table 2: "Benchmark results of all Xformer models with a consistent batch size of
/// 32 across all models" (steps per second with the printed speed-up over the Transformer, and
/// peak memory usage in GB per TPU device). Sparse Trans. and Longformer have no row there.
///
/// Note: Synthesizer's 3K entry is printed as 6.6 (2.9x), faster than its 2K entry; kept as printed.
pub const TABLE2: [Table2Row; 9] = [
    Table2Row {
        model: "Transformer",
        steps_per_s: [8.1, 4.9, 2.3, 1.4],
        speedup: None,
        peak_memory_gb: [0.85, 2.65, 5.51, 9.48],
    },
    t2(
        "Local Attention",
        [9.2, 8.4, 7.4, 7.4],
        [1.1, 1.7, 3.2, 5.3],
        [0.42, 0.76, 1.06, 1.37],
    ),
    t2(
        "Linformer",
        [9.3, 9.1, 8.5, 7.7],
        [1.2, 1.9, 3.7, 5.5],
        [0.37, 0.55, 0.99, 0.99],
    ),
    t2(
        "Reformer",
        [4.4, 2.2, 1.5, 1.1],
        [0.5, 0.4, 0.7, 0.8],
        [0.48, 0.99, 1.53, 2.28],
    ),
    t2(
        "Sinkhorn Trans.",
        [9.1, 7.9, 6.6, 5.3],
        [1.1, 1.6, 2.9, 3.8],
        [0.47, 0.83, 1.13, 1.48],
    ),
    t2(
        "Synthesizer",
        [8.7, 5.7, 6.6, 1.9],
        [1.1, 1.2, 2.9, 1.4],
        [0.65, 1.98, 4.09, 6.99],
    ),
    t2(
        "BigBird",
        [7.4, 3.9, 2.7, 1.5],
        [0.9, 0.8, 1.2, 1.1],
        [0.77, 1.49, 2.18, 2.88],
    ),
    t2(
        "Linear Trans.",
        [9.1, 9.3, 8.6, 7.8],
        [1.1, 1.9, 3.7, 5.6],
        [0.37, 0.57, 0.80, 1.03],
    ),
    t2(
        "Performer",
        [9.5, 9.4, 8.7, 8.0],
        [1.2, 1.9, 3.8, 5.7],
        [0.37, 0.59, 0.82, 1.06],
    ),
];

/// Our variant names and the paper's model they correspond to.
pub const VARIANT_TO_PAPER: [(&str, &str); 5] = [
    ("vanilla", "Transformer"),
    ("local", "Local Attention"),
    ("linformer", "Linformer"),
    ("linear-elu", "Linear Trans."),
    ("performer", "Performer"),
];

/// The paper's model name for one of our variants, if one corresponds.
pub fn paper_model(variant: &str) -> Option<&'static str> {
    VARIANT_TO_PAPER
        .iter()
        .find(|(v, _)| *v == variant)
        .map(|(_, m)| *m)
}

/// Our variant corresponding to a paper model name, if any.
pub fn our_variant(model: &str) -> Option<&'static str> {
    VARIANT_TO_PAPER
        .iter()
        .find(|(_, m)| *m == model)
        .map(|(v, _)| *v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn printed_averages_match_the_five_tasks() {
        for row in TABLE1 {
            let mean = row.tasks().iter().flatten().sum::<f64>() / 5.0;
            // Sinkhorn Trans. is printed 51.39 (mean 51.476); all others round exactly.
            let tol = if row.model == "Sinkhorn Trans." {
                0.1
            } else {
                0.006
            };
            assert!((mean - row.avg).abs() < tol, "{}: {mean}", row.model);
        }
    }

    #[test]
    fn printed_speedups_match_steps() {
        let base = TABLE2[0].steps_per_s;
        for row in &TABLE2[1..] {
            let up = row.speedup.unwrap();
            for i in 0..4 {
                let r = row.steps_per_s[i] / base[i];
                assert!((r - up[i]).abs() < 0.06, "{} {i}: {r}", row.model);
            }
        }
    }

    #[test]
    fn mapping_is_consistent() {
        for (v, m) in VARIANT_TO_PAPER {
            assert!(TABLE1.iter().any(|r| r.model == m));
            assert!(TABLE2.iter().any(|r| r.model == m));
            assert_eq!(our_variant(m), Some(v));
            assert_eq!(paper_model(v), Some(m));
        }
    }
}

//! What the report says besides the numbers, from the arena's options and records.

use std::collections::BTreeMap;

use crate::exec::{configure, grid_positions, SPEED_STEPS, SPEED_WARMUP};
use crate::plan::{Budget, Options};
use crate::results::{Record, RunResult};

/// What the report says besides the numbers: which suite ran, the size budget, the data of
/// each task, what each variant is and how speed and memory were measured.
pub fn report_meta(opts: Option<&Options>, records: &[Record]) -> super::ReportMeta {
    let runs: Vec<&RunResult> = records
        .iter()
        .filter_map(|r| match r {
            Record::Run(r) => Some(r),
            _ => None,
        })
        .collect();
    let mut suites: Vec<&str> = runs.iter().map(|r| r.suite.as_str()).collect();
    suites.sort();
    suites.dedup();
    let suite = opts
        .map(|o| o.suite.setting.name().to_string())
        .unwrap_or_else(|| suites.join(" + "));
    let mut notes = Vec::new();
    if let Some(o) = opts {
        let s = &o.suite;
        notes.push(format!(
            "Suite `{}`: every variant is {} layers of width {} with {} heads and a 4× MLP, \
             mean-pooled classification head, learned positions (image tasks: below), \
             PyTorch's default initialisation; batch {}, AdamW at lr {} with \
             10% warm-up and cosine decay; budget per run: {}; {} seed(s).",
            s.setting.name(),
            s.n_layers,
            s.d_model,
            s.n_heads,
            s.batch_size,
            s.lr,
            match o.budget {
                Budget::Suite => {
                    let steps: Vec<String> = o
                        .tasks
                        .iter()
                        .map(|t| format!("{t} {}", s.steps(t)))
                        .collect();
                    format!(
                        "the suite's optimizer steps per task ({})",
                        steps.join(", ")
                    )
                }
                Budget::Steps(n) => format!("{n} optimizer steps"),
                Budget::Minutes(m) => {
                    format!("{m} minutes of training, converted to steps per run")
                }
            },
            o.seeds
        ));
    }
    if suite.contains("lite") {
        notes.push(format!(
            "The lite suite is not LRA's setting: sequences of at most 256 tokens, ListOps \
             trees of depth at most {} (LRA: 10), small splits, tiny models and short \
             budgets, so that it runs on two CPU cores. Compare variants with each other; \
             the paper's numbers (full setting, TPU) are printed for reference only.",
            crate::listops::LITE_MAX_DEPTH
        ));
    }
    let mut by_task: BTreeMap<&str, &RunResult> = BTreeMap::new();
    for r in &runs {
        by_task.entry(r.task.as_str()).or_insert(r);
    }
    for (task, r) in &by_task {
        notes.push(format!(
            "`{task}`: inputs padded to {} tokens, {} test examples; data: {}.",
            r.seq_len, r.test_examples, r.source
        ));
    }
    if by_task.contains_key("retrieval") {
        notes.push(
            "`retrieval` encodes its two documents apart with one shared encoder (LRA's \
             two towers) and classifies the pooled pair [u, v, u*v, |u-v|] with a linear \
             layer (LRA: [u, v, u*v, u-v] and an MLP). Its speed and memory figures are the \
             speed jobs' (one sequence of the input's length), not those of two sequences \
             of half that length, which cost a quadratic mixer less."
                .into(),
        );
    }
    if let Some(note) = opts.and_then(|o| grid_note(o, &by_task)) {
        notes.push(note);
    }
    for r in records {
        if let Record::Skipped(s) = r {
            notes.push(format!("`{}` skipped: {}", s.task, s.reason));
        }
    }
    if let Some((lo, hi)) = param_range(&runs) {
        notes.push(format!(
            "Same size budget: parameters range from {} ({}) to {} ({}) on `{}`; the \
             differences are the variants' own (low-rank factors, Linformer projections, \
             DenseFormer weights).",
            lo.params, lo.variant, hi.params, hi.variant, lo.task
        ));
    }
    if let Some(o) = opts {
        for v in &o.variants {
            notes.push(format!("Variant `{}`: {}", v.name, v.description));
        }
        if o.speed {
            notes.push(format!(
                "Speed and memory (Table 2): one training step (forward, backward, AdamW) on \
                 random bytes at batch {}, median of {SPEED_STEPS} steps after {SPEED_WARMUP} \
                 warm-up steps; memory is the peak resident set of the process, each \
                 measurement in its own process.",
                o.suite.speed_batch
            ));
        }
    }
    let wall: f64 = runs.iter().map(|r| r.wall_s).sum();
    if wall > 0.0 {
        notes.push(format!(
            "Training runs took {:.1} minutes in total (sum of run wall times).",
            wall / 60.0
        ));
    }
    let variant_order = match opts {
        Some(o) => o.variants.iter().map(|v| v.name.clone()).collect(),
        None => crate::variants::builtin_names()
            .into_iter()
            .map(String::from)
            .collect(),
    };
    super::ReportMeta {
        title: format!("formers arena — {suite} suite"),
        notes,
        variant_order,
    }
}

/// The runs with the fewest and most parameters on the first task that has runs.
fn param_range<'a>(runs: &[&'a RunResult]) -> Option<(&'a RunResult, &'a RunResult)> {
    let task = runs.iter().map(|r| r.task.as_str()).min()?;
    let on_task = runs.iter().filter(|r| r.task == task);
    let lo = on_task
        .clone()
        .min_by_key(|r| (r.params, r.variant.clone()))?;
    let hi = on_task.max_by_key(|r| (r.params, r.variant.clone()))?;
    Some((lo, hi))
}

/// Which variants see the image tasks' pixels in two dimensions (the suite's
/// `image_rope_base`), when an image task ran.
fn grid_note(o: &Options, by_task: &BTreeMap<&str, &RunResult>) -> Option<String> {
    let base = o.suite.image_rope_base?;
    let images: Vec<(&str, usize)> = by_task
        .iter()
        .filter(|(t, _)| matches!(**t, "pathfinder" | "pathx" | "image"))
        .map(|(t, r)| (*t, r.seq_len.isqrt()))
        .collect();
    let &(_, width) = images.first()?;
    let names: Vec<String> = images.iter().map(|(t, _)| format!("`{t}`")).collect();
    let table: Vec<&str> = o
        .variants
        .iter()
        .filter(|v| {
            let m = configure(v, &o.suite, 256, width * width, 2);
            grid_positions(&m, &o.suite, width).is_none()
        })
        .map(|v| v.name.as_str())
        .collect();
    let kept = if table.is_empty() {
        "every variant here takes them".to_string()
    } else {
        format!("{} keep their own positions", table.join(", "))
    };
    Some(format!(
        "Images ({}) are read row by row; the lite models get each pixel's row and column \
         as 2-D rotary positions (base {base}) instead of the learned 1-D table ({kept}). \
         LRA uses 1-D positions; from them the lite model learns no pixel adjacency within \
         its budget.",
        names.join(", ")
    ))
}

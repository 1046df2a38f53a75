//! The report's tables: accuracy (LRA Table 1 layout), speed and memory (LRA Table 2 layout),
//! per-run details, and the paper's reference tables.

use super::agg::{
    bytes_to_mib, ratio, task_title, ChanceKind, Runs, Speeds, BASELINE, MIN_CHANCE_MARGIN_PCT,
};
use super::table::{Align, Table};
use crate::lra;

/// `—`, shown for a missing value.
pub const DASH: &str = "—";

/// Accuracy cell: `64.27`, or `64.27 ± 1.20` with two or more seeds.
pub fn fmt_acc(mean: f64, std: f64, seeds: usize) -> String {
    if seeds >= 2 {
        format!("{mean:.2} ± {std:.2}")
    } else {
        format!("{mean:.2}")
    }
}

/// A plain number with precision adapted to its size.
pub fn fmt_num(x: f64) -> String {
    if !x.is_finite() {
        return DASH.to_string();
    }
    match x.abs() {
        a if a >= 100.0 => format!("{x:.0}"),
        a if a >= 10.0 => format!("{x:.1}"),
        a if a >= 1.0 => format!("{x:.2}"),
        _ => format!("{x:.3}"),
    }
}

/// A ratio to the baseline: `1.70×`.
pub fn fmt_ratio(r: f64) -> String {
    format!("{r:.2}×")
}

/// A count with a k/M/G suffix: `1.23 M`.
pub fn fmt_si(x: f64) -> String {
    if !x.is_finite() {
        return DASH.to_string();
    }
    let (v, unit) = match x.abs() {
        a if a >= 1e9 => (x / 1e9, " G"),
        a if a >= 1e6 => (x / 1e6, " M"),
        a if a >= 1e3 => (x / 1e3, " k"),
        _ => (x, ""),
    };
    format!("{}{unit}", fmt_num(v))
}

/// A sequence length: `1K` for multiples of 1024, the number otherwise.
pub fn fmt_len(n: usize) -> String {
    if n >= 1024 && n.is_multiple_of(1024) {
        format!("{}K", n / 1024)
    } else {
        n.to_string()
    }
}

fn opt(x: Option<String>) -> String {
    x.unwrap_or_else(|| DASH.to_string())
}

/// Our accuracy table: rows = variants, columns = tasks in LRA order, then Avg over the
/// learned tasks; a last row gives chance where it is known.
pub fn table1(runs: &Runs) -> Table {
    let mut header = vec!["Variant".to_string()];
    header.extend(runs.tasks.iter().map(|t| task_title(t)));
    header.push("Avg".to_string());
    let mut t = Table::new("formers — test accuracy (%)", header);
    let n_learned = runs.learned_tasks().len();
    let mut partial = false;
    for v in &runs.variants {
        let mut row = vec![v.clone()];
        for task in &runs.tasks {
            row.push(table1_cell(runs, task, v));
        }
        row.push(match runs.average_pct(v) {
            Some((m, k)) if k < n_learned => {
                partial = true;
                format!("{m:.2} ({k}/{n_learned})")
            }
            Some((m, _)) => format!("{m:.2}"),
            None => DASH.to_string(),
        });
        t.push_row(row);
    }
    if runs.tasks.iter().any(|task| runs.chance(task).is_some()) && !runs.variants.is_empty() {
        let mut row = vec![CHANCE_ROW.to_string()];
        row.extend(runs.tasks.iter().map(|task| {
            opt(runs.chance(task).map(|c| match c.kind {
                ChanceKind::Majority => format!("{:.2} (majority)", c.pct),
                ChanceKind::Uniform(n) => format!("{:.2} (1/{n})", c.pct),
            }))
        }));
        row.push(String::new());
        t.push_row(row);
    }
    t.footnotes = table1_footnotes(runs, partial);
    t
}

/// First cell of Table 1's chance row.
pub const CHANCE_ROW: &str = "chance";

/// Suffix of an accuracy within noise of chance.
pub const AT_CHANCE: &str = "(at chance)";

fn table1_cell(runs: &Runs, task: &str, variant: &str) -> String {
    match runs.cell(task, variant) {
        Some(cell) => {
            let acc = opt(cell
                .accuracy_pct()
                .map(|(m, s)| fmt_acc(m, s, cell.runs.len())));
            match runs.cell_at_chance(task, variant) {
                true => format!("{acc} {AT_CHANCE}"),
                false => acc,
            }
        }
        None if runs.skipped.contains_key(task) => "skipped".to_string(),
        None => DASH.to_string(),
    }
}

fn table1_footnotes(runs: &Runs, partial: bool) -> Vec<String> {
    let mut notes = vec![
        "Test accuracy on the whole test split, %; with two or more seeds: mean ± sample \
         standard deviation over seeds."
            .to_string(),
    ];
    if runs.tasks.iter().any(|t| runs.chance(t).is_some()) {
        notes.push(format!(
            "{AT_CHANCE}: no more than two binomial standard errors of the test split (at least \
             {MIN_CHANCE_MARGIN_PCT} points) above chance, i.e. no sign of learning. Row \
             `{CHANCE_ROW}`: the test split's majority-class rate where the runs recorded it, \
             else 1 / classes."
        ));
    }
    let stuck: Vec<String> = runs
        .run_tasks()
        .iter()
        .filter(|t| runs.at_chance(t))
        .map(|t| task_title(t))
        .collect();
    let learned = runs.learned_tasks();
    if learned.is_empty() && !runs.run_tasks().is_empty() {
        notes.push(format!(
            "Avg: none. No variant beat chance on any task ({}), so there is nothing to rank \
             the variants by; train longer (a larger --budget).",
            stuck.join(", ")
        ));
    } else {
        notes.push(
            "Avg: mean over the task columns that have runs and on which some variant beat \
             chance (unlike LRA, Path-X is included when it ran)."
                .to_string(),
        );
        if !stuck.is_empty() {
            notes.push(format!(
                "Left out of Avg: {} (every variant at chance: nothing learned, so these \
                 columns say nothing about which variant is better).",
                stuck.join(", ")
            ));
        }
    }
    if partial {
        notes.push(
            "(k/n) after an Avg: the row has only k of the n tasks, so its Avg is not \
             comparable with full rows."
                .to_string(),
        );
    }
    for (task, reasons) in &runs.skipped {
        let reasons: Vec<&str> = reasons.iter().map(String::as_str).collect();
        notes.push(format!(
            "{} skipped: {}",
            task_title(task),
            reasons.join("; ")
        ));
    }
    if runs.variants.is_empty() {
        notes.push("No finished runs.".to_string());
    }
    notes
}

/// The paper's Table 1, with the corresponding formers variant.
pub fn paper_table1() -> Table {
    let mut header = vec!["Model".to_string(), "formers variant".to_string()];
    header.extend(
        [
            "ListOps",
            "Text",
            "Retrieval",
            "Image",
            "Pathfinder",
            "Path-X",
            "Avg",
        ]
        .map(String::from),
    );
    let mut t = Table::new(
        "LRA paper (Tay et al. 2021, Table 1, full setting — reference numbers, not produced by \
         formers)",
        header,
    );
    t.align[1] = Align::Left;
    for r in lra::TABLE1 {
        let mut row = vec![
            r.model.to_string(),
            lra::our_variant(r.model).unwrap_or("").to_string(),
        ];
        row.extend(
            r.tasks()
                .iter()
                .map(|a| a.map_or_else(|| "FAIL".to_string(), |a| format!("{a:.2}"))),
        );
        row.push(format!("{:.2}", r.avg));
        t.push_row(row);
    }
    t.footnotes = vec![
        "Test accuracy %, as printed in the paper; FAIL = no better than chance. The paper's Avg \
         excludes Path-X."
            .to_string(),
        "Sinkhorn Trans.'s Avg is printed as 51.39 (its five accuracies average 51.48; the LRA \
         repository README prints 51.29)."
            .to_string(),
    ];
    t
}

/// Our speed and memory table: vanilla absolute, others relative to vanilla at each length.
pub fn table2(speeds: &Speeds) -> Table {
    let n = speeds.lengths.len();
    let mut header = vec!["Variant".to_string()];
    for _ in 0..2 {
        header.extend(speeds.lengths.iter().map(|l| fmt_len(*l)));
    }
    let mut t = Table::new("formers — training speed and peak memory", header);
    t.groups = vec![
        ("Steps per second".to_string(), n),
        ("Peak memory".to_string(), n),
    ];
    t.groups.insert(0, (String::new(), 1));
    let mut missing_base: Vec<usize> = Vec::new();
    for v in &speeds.variants {
        let mut row = vec![v.clone()];
        let mut mem = Vec::new();
        for &len in &speeds.lengths {
            let has_base = speeds.steps(BASELINE, len).is_some();
            if !has_base && !missing_base.contains(&len) {
                missing_base.push(len);
            }
            row.push(speed_cell(speeds, v, len));
            mem.push(memory_cell(speeds, v, len));
        }
        row.extend(mem);
        t.push_row(row);
    }
    t.footnotes = table2_footnotes(speeds, &missing_base);
    t
}

fn speed_cell(speeds: &Speeds, variant: &str, len: usize) -> String {
    let Some(own) = speeds.steps(variant, len) else {
        return DASH.to_string();
    };
    match speeds.steps(BASELINE, len) {
        Some(_) if variant == BASELINE => fmt_num(own),
        Some(base) => opt(ratio(own, base).map(fmt_ratio)),
        None => format!("{} (abs)", fmt_num(own)),
    }
}

fn memory_cell(speeds: &Speeds, variant: &str, len: usize) -> String {
    let Some(own) = speeds.mib(variant, len) else {
        return DASH.to_string();
    };
    match speeds.mib(BASELINE, len) {
        Some(_) if variant == BASELINE => format!("{own:.0} MiB"),
        Some(base) => opt(ratio(own, base).map(fmt_ratio)),
        None => format!("{own:.0} MiB"),
    }
}

fn table2_footnotes(speeds: &Speeds, missing_base: &[usize]) -> Vec<String> {
    let mut notes = vec![format!(
        "Row `{BASELINE}`: absolute values (optimizer steps per second; peak resident memory of \
         the process, MiB). Other rows: ratio to `{BASELINE}` at the same length (speed > 1× is \
         faster, memory < 1× is smaller)."
    )];
    if !speeds.is_empty() {
        notes.push(
            "These are the speed and memory figures the verdict and the accuracy-vs-speed \
             chart use, taken at the measured length nearest each task's input length."
                .to_string(),
        );
    }
    notes.push(
        "Peak memory here is the process's peak RSS on CPU (runtime and weights included), not \
         per-device accelerator memory as in LRA, so ratios are compressed towards 1×."
            .to_string(),
    );
    if !missing_base.is_empty() {
        let lens: Vec<String> = missing_base.iter().map(|l| fmt_len(*l)).collect();
        notes.push(format!(
            "No `{BASELINE}` measurement at length {}: absolute values shown there.",
            lens.join(", ")
        ));
    }
    if speeds.is_empty() {
        notes.push("No speed measurements.".to_string());
    }
    notes
}

/// The paper's Table 2, with its printed speed-ups.
pub fn paper_table2() -> Table {
    let lens: Vec<String> = lra::TABLE2_LENGTHS.iter().map(|l| fmt_len(*l)).collect();
    let mut header = vec!["Model".to_string(), "formers variant".to_string()];
    header.extend(lens.iter().cloned());
    header.extend(lens.iter().cloned());
    let mut t = Table::new(
        "LRA paper (Tay et al. 2021, Table 2 — reference numbers, not produced by formers)",
        header,
    );
    t.align[1] = Align::Left;
    t.groups = vec![
        (String::new(), 2),
        ("Steps per second".to_string(), 4),
        ("Peak memory (GB)".to_string(), 4),
    ];
    for r in lra::TABLE2 {
        let mut row = vec![
            r.model.to_string(),
            lra::our_variant(r.model).unwrap_or("").to_string(),
        ];
        for i in 0..4 {
            row.push(match r.speedup {
                Some(up) => format!("{:.1} ({:.1}×)", r.steps_per_s[i], up[i]),
                None => format!("{:.1}", r.steps_per_s[i]),
            });
        }
        row.extend(r.peak_memory_gb.iter().map(|m| format!("{m:.2}")));
        t.push_row(row);
    }
    t.footnotes = vec![
        "Byte-level text classification, batch size 32, 4x4 TPU v3; speed-up over the \
         Transformer in brackets, as printed; memory is per TPU device. Sparse Trans. and \
         Longformer have no row in the paper's Table 2."
            .to_string(),
    ];
    t
}

/// Per (task, variant): size, cost, speed, memory, time, steps and seeds.
pub fn details(runs: &Runs) -> Table {
    let header = [
        "Task",
        "Variant",
        "Length",
        "Params",
        "FLOPs/token",
        "Train steps/s",
        "Infer tokens/s",
        "Peak RSS MiB",
        "Wall s",
        "Steps",
        "Seeds",
    ]
    .map(String::from)
    .to_vec();
    let mut t = Table::new(
        "Per task and variant (means over seeds; peak RSS: max)",
        header,
    );
    t.align[1] = Align::Left;
    let mut threads = Vec::new();
    for task in &runs.tasks {
        for v in &runs.variants {
            if let Some(cell) = runs.cell(task, v) {
                t.push_row(details_row(task, v, cell));
                threads.extend(cell.runs.iter().map(|r| r.threads).filter(|&n| n > 0));
            }
        }
    }
    if t.rows.is_empty() {
        t.footnotes.push("No finished runs.".to_string());
    } else {
        t.footnotes.push(
            "Seeds: how many seeds (independent runs: weights, data order and dropout drawn \
             from that seed) the row averages over, then their values. With one seed the \
             numbers carry no estimate of run-to-run spread."
                .to_string(),
        );
    }
    threads.sort_unstable();
    threads.dedup();
    if !threads.is_empty() {
        let list: Vec<String> = threads.iter().map(usize::to_string).collect();
        t.footnotes.push(format!(
            "Train steps/s: each run on {} compute thread(s); runs that train at once \
             (`--jobs`) share the cores, so compare speeds in the speed table, whose jobs run \
             alone.",
            list.join(" or ")
        ));
    }
    t
}

fn details_row(task: &str, variant: &str, cell: &super::agg::Cell) -> Vec<String> {
    let lens = range_text(cell.runs.iter().map(|r| r.seq_len).collect());
    let steps = range_text(cell.runs.iter().map(|r| r.steps).collect());
    let seeds: Vec<String> = cell.seeds().iter().map(u64::to_string).collect();
    vec![
        task_title(task),
        variant.to_string(),
        lens,
        opt(cell.max_of(|r| r.params).map(|p| fmt_si(p as f64))),
        opt(cell.mean_of(|r| r.flops_per_token).map(fmt_si)),
        opt(cell.mean_of(|r| r.train_steps_per_s).map(fmt_num)),
        opt(cell.mean_of(|r| r.infer_tokens_per_s).map(fmt_si)),
        opt(cell
            .max_of(|r| r.peak_rss_bytes)
            .map(|b| format!("{:.0}", bytes_to_mib(b)))),
        opt(cell.mean_of(|r| r.wall_s).map(fmt_num)),
        steps,
        seeds_text(&seeds),
    ]
}

/// `1 (seed 0)`, `3 (seeds 0, 1, 2)`: how many seeds, then which.
fn seeds_text(seeds: &[String]) -> String {
    match seeds.len() {
        1 => format!("1 (seed {})", seeds[0]),
        n => format!("{n} (seeds {})", seeds.join(", ")),
    }
}

/// `n` when all values are equal, `min–max` otherwise.
fn range_text(mut v: Vec<usize>) -> String {
    v.sort_unstable();
    match (v.first(), v.last()) {
        (Some(a), Some(b)) if a == b => a.to_string(),
        (Some(a), Some(b)) => format!("{a}–{b}"),
        _ => DASH.to_string(),
    }
}

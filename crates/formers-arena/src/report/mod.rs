//! The arena report, laid out like Long Range Arena (Tay et al., ICLR 2021) Tables 1–2 and Figure 3.
//!
//! Everything is built from a set of [`Record`]s and depends only on that set, not on record
//! order: Markdown tables, SVG charts and one self-contained HTML page. [`write_dir`] reports
//! an arena directory; a job key stored twice in its `results.jsonl` is flagged on the page
//! and returned as a warning, and the first record of the key is the one reported.

mod agg;
mod charts;
pub use charts::{scatter, Bubble};
mod meta;
mod page;
mod table;
mod tables;
pub mod verdict;

use std::path::{Path, PathBuf};

use crate::results::{self, Record};

pub use agg::BASELINE;
pub use charts::Chart;
pub use meta::report_meta;
pub use table::{html_escape, Align, Table};

/// What the runner tells the report besides the records.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ReportMeta {
    /// Page title, e.g. "formers arena — lite suite".
    pub title: String,
    /// Lines rendered as a bullet list (suite, budget, model size, task sources, duration).
    pub notes: Vec<String>,
    /// Row order; "vanilla" is the baseline for relative speed and memory.
    pub variant_order: Vec<String>,
}

/// The report's sections, each a heading and its tables.
struct Sections {
    verdict: Vec<String>,
    table1: Vec<Table>,
    table2: Vec<Table>,
    details: Vec<Table>,
}

fn sections(records: &[Record], meta: &ReportMeta) -> Sections {
    let runs = agg::Runs::new(records, &meta.variant_order);
    let speeds = agg::Speeds::new(records, &meta.variant_order);
    Sections {
        verdict: verdict::lines(&runs, &speeds),
        table1: vec![tables::table1(&runs), tables::paper_table1()],
        table2: vec![tables::table2(&speeds), tables::paper_table2()],
        details: vec![tables::details(&runs)],
    }
}

fn markdown(tables: &[Table]) -> String {
    tables
        .iter()
        .map(Table::to_markdown)
        .collect::<Vec<_>>()
        .join("\n")
}

/// The verdict the report opens with, one Markdown bullet per line: per task, the Pareto
/// front of accuracy against speed and memory (see [`verdict`]).
pub fn verdict_markdown(records: &[Record], meta: &ReportMeta) -> String {
    sections(records, meta)
        .verdict
        .iter()
        .map(|l| format!("- {}\n", table::md_escape(l)))
        .collect()
}

/// Accuracy table in the LRA Table 1 layout, followed by the paper's Table 1 for reference.
pub fn table1_markdown(records: &[Record], meta: &ReportMeta) -> String {
    markdown(&sections(records, meta).table1)
}

/// Speed and memory table in the LRA Table 2 layout, followed by the paper's Table 2.
pub fn table2_markdown(records: &[Record], meta: &ReportMeta) -> String {
    markdown(&sections(records, meta).table2)
}

/// Per (task, variant): params, FLOPs/token, train steps/s, inference tokens/s, peak RSS,
/// wall time, steps and seeds.
pub fn details_markdown(records: &[Record], meta: &ReportMeta) -> String {
    markdown(&sections(records, meta).details)
}

/// The charts that have data (accuracy vs speed, loss per task, speed and memory vs length).
pub fn charts(records: &[Record], meta: &ReportMeta) -> Vec<Chart> {
    let runs = agg::Runs::new(records, &meta.variant_order);
    let speeds = agg::Speeds::new(records, &meta.variant_order);
    let variants = all_variants(&runs, &speeds);
    charts::all(&runs, &speeds, &variants)
}

/// Variants of runs and speed records together (for stable chart colours).
fn all_variants(runs: &agg::Runs, speeds: &agg::Speeds) -> Vec<String> {
    let mut v = runs.variants.clone();
    v.extend(
        speeds
            .variants
            .iter()
            .filter(|s| !runs.variants.contains(s))
            .cloned(),
    );
    v
}

/// Writes `dir/report.md`, one `dir/*.svg` per chart and `dir/index.html` (self-contained, the
/// SVGs inline); returns the path of `index.html`.
pub fn write_report(records: &[Record], meta: &ReportMeta, dir: &Path) -> std::io::Result<PathBuf> {
    std::fs::create_dir_all(dir)?;
    let s = sections(records, meta);
    let charts = charts(records, meta);
    for c in &charts {
        std::fs::write(dir.join(&c.file), &c.svg)?;
    }
    let doc = page::Document {
        meta,
        verdict: &s.verdict,
        table1: &s.table1,
        table2: &s.table2,
        details: &s.details,
        charts: &charts,
    };
    std::fs::write(dir.join("report.md"), doc.markdown())?;
    let index = dir.join("index.html");
    std::fs::write(&index, doc.html())?;
    Ok(index)
}

/// A report written from an arena directory.
#[derive(Debug, Clone, PartialEq)]
pub struct Written {
    /// `report/index.html`.
    pub index: PathBuf,
    /// What the page notes and the caller should also say (a key stored twice).
    pub warnings: Vec<String>,
}

/// Writes `dir/report/` from `dir`'s results and options (no lock needed: it only reads
/// them). Keys stored more than once are reported once (their first record) and named in a
/// note at the top of the page and in [`Written::warnings`].
pub fn write_dir(dir: &Path) -> Result<Written, String> {
    let store = dir.join(results::FILE);
    if !store.exists() {
        return Err(format!("{}: no arena results here", store.display()));
    }
    let unique = results::load_unique(&store)?;
    let opts = crate::plan::load_options(dir);
    let mut meta = report_meta(opts.as_ref(), &unique.records);
    let mut warnings = unique.invalid_notes(&store);
    warnings.extend(unique.duplicates_note(&store));
    meta.notes.splice(0..0, warnings.iter().cloned());
    let out = dir.join("report");
    let index = write_report(&unique.records, &meta, &out)
        .map_err(|e| format!("writing the report into {}: {e}", out.display()))?;
    Ok(Written { index, warnings })
}

#[cfg(test)]
mod tests;

//! The arena: Long-Range-Arena-style tasks (Tay et al. 2021, "Long Range Arena: A Benchmark
//! for Efficient Transformers"), a runner over variants × tasks × seeds, a results store
//! that survives a kill, and a report (Markdown tables, SVG charts, one HTML page).

pub mod adapter;
pub mod flops;
pub mod mem;
pub mod results;
pub mod task;

pub use task::{example_rng, ArenaTask, Example, Setting, Split};

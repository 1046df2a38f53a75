//! The arena: Long-Range-Arena-style tasks (Tay et al. 2021, "Long Range Arena: A Benchmark
//! for Efficient Transformers"), a runner over variants × tasks × seeds, a results store
//! that survives a kill, and a report (Markdown tables, SVG charts, one HTML page).

pub mod adapter;
pub mod baseline;
pub mod corpus;
pub mod exec;
pub mod flops;
#[cfg(any(test, feature = "fuzzing"))]
pub mod fuzzing;
pub mod image;
pub mod jobdir;
pub mod listops;
pub mod lra;
pub mod mem;
pub mod pathfinder;
pub mod pidlock;
pub mod plan;
pub mod pool;
pub mod report;
pub mod results;
pub mod retrieval;
pub mod runner;
pub mod suite;
pub mod task;
pub mod text;
pub mod variants;
pub mod worker;

pub use task::{example_rng, ArenaTask, Example, Setting, Split};

//! The flags that move formers' limits (see `formers::limits`): the memory budget and
//! whether non-finite weights load.

use clap::Args;
use formers::limits::{parse_size, Limits};

/// `--max-memory`, for commands that build a model.
#[derive(Debug, Clone, Args)]
pub struct MemoryArgs {
    /// Memory the model may need: parameters, plus gradients, optimizer state and
    /// activations when training (e.g. 32GiB, 500MB, or bytes) [default: this machine's RAM]
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    pub max_memory: Option<u64>,
}

impl MemoryArgs {
    /// The limits these flags set (finite weights only).
    pub fn limits(&self) -> Limits {
        let mut limits = Limits::default();
        if let Some(m) = self.max_memory {
            limits.max_memory = m;
        }
        limits
    }
}

/// `--max-memory` and `--allow-non-finite`, for commands that load weights.
#[derive(Debug, Clone, Args)]
pub struct LoadArgs {
    #[command(flatten)]
    pub memory: MemoryArgs,
    /// Load weights holding NaN or infinity (refused by default, naming the tensor); `embed`
    /// then prints the non-finite embeddings they give instead of refusing them
    #[arg(long)]
    pub allow_non_finite: bool,
}

impl LoadArgs {
    /// The limits these flags set.
    pub fn limits(&self) -> Limits {
        Limits {
            allow_non_finite: self.allow_non_finite,
            ..self.memory.limits()
        }
    }
}

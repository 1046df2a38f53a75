//! `formers`: the command-line front of the formers library. It wires flags to library
//! calls and draws progress; it holds no model logic.

mod arena;
mod bench;
mod embed;
mod generate;
mod limits;
mod progress;
mod train;

use clap::{Parser, Subcommand};

/// Build, train, run and benchmark efficient Transformers on a CPU.
#[derive(Debug, Parser)]
#[command(name = "formers", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Train a model on a built-in task; writes checkpoints, metrics and a sample.
    Train(train::TrainArgs),
    /// Evaluate a trained run on its task's held-out data.
    Eval(train::EvalArgs),
    /// Sentence embeddings from a BERT-family checkpoint: lines on stdin, JSON lines (or .npy) out.
    Embed(embed::EmbedArgs),
    /// Continue a prompt with a causal LM: a formers run or a GPT-2-family checkpoint (uses the KV cache).
    Generate(generate::GenerateArgs),
    /// The arena: train every variant on Long-Range-Arena tasks and report accuracy, speed and memory.
    Arena(arena::ArenaArgs),
    /// Measure speed and memory.
    #[command(subcommand)]
    Bench(bench::BenchCommand),
}

fn main() {
    formers_arena::mem::tune_allocator();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Train(a) => train::run(a),
        Command::Eval(a) => train::eval(a),
        Command::Embed(a) => embed::run(a),
        Command::Generate(a) => generate::run(a),
        Command::Bench(c) => bench::run(c),
        Command::Arena(a) => arena::run(a),
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

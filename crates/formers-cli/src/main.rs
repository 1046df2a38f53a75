//! `formers`: the command-line front of the formers library. It wires flags to library
//! calls and draws progress; it holds no model logic.

mod arena;
mod bench;
mod compress;
mod embed;
mod generate;
mod limits;
mod progress;
mod serve;
mod train;

use clap::{Parser, Subcommand};

/// Train, evaluate, generate, embed, serve, compare (arena) and benchmark efficient
/// Transformers on a CPU (the one-line `--help` is the package description).
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
    /// Evaluate a trained run on its task's held-out data (an arena run: its whole test split).
    Eval(train::EvalArgs),
    /// Sentence embeddings from a BERT-family checkpoint: lines on stdin, JSON lines (or .npy) out.
    Embed(embed::EmbedArgs),
    /// Continue a prompt with a causal LM: a formers run or a GPT-2-family checkpoint (uses the KV cache).
    Generate(generate::GenerateArgs),
    /// Serve a checkpoint over HTTP: OpenAI-shaped embeddings or completions, with dynamic batching.
    Serve(serve::ServeArgs),
    /// The arena: train every variant on Long-Range-Arena tasks and report accuracy, speed and memory.
    Arena(Box<arena::ArenaArgs>),
    /// Compress a checkpoint (int8 weights, RMSNorm) into a directory the other commands load.
    #[command(subcommand)]
    Compress(compress::CompressCommand),
    /// Measure speed and memory.
    #[command(subcommand)]
    Bench(bench::BenchCommand),
}

/// candle runs elementwise ops on a pool of threads that spin while they wait; when a core
/// is busy with anything else, a descheduled spinner stalls every op (training the char-LM
/// took 3-4x longer on this 2-core machine while other work ran). formers runs those ops on
/// the calling thread unless `CANDLE_NUM_THREADS` says otherwise; matrix products and
/// formers' own kernels still use `RAYON_NUM_THREADS` threads.
fn keep_candle_ops_on_the_calling_thread() {
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        // Before any thread exists: nothing else reads the environment concurrently.
        std::env::set_var("CANDLE_NUM_THREADS", "1");
    }
}

fn main() {
    keep_candle_ops_on_the_calling_thread();
    formers_arena::mem::tune_allocator();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Train(a) => train::run(a),
        Command::Eval(a) => train::eval(a),
        Command::Embed(a) => embed::run(a),
        Command::Generate(a) => generate::run(a),
        Command::Serve(a) => serve::run(a),
        Command::Bench(c) => bench::run(c),
        Command::Compress(c) => compress::run(c),
        Command::Arena(a) => arena::run(*a),
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

//! Train a small model for a few steps on a built-in toy task, in memory.
//!
//!     cargo run --release -p formers --example train_toy [-- STEPS]
//!
//! The model is the shipped `configs/reverse.json` (a bidirectional encoder); the task
//! `reverse` asks it to output its input sequence reversed. `formers train` does the same
//! with a run directory (checkpoints, metrics, resume) around it: `formers::train::RunDir`.

use std::path::Path;

use formers::tasks;
use formers::train::RunConfig;
use formers::train::Trainer;

fn main() -> formers::Result<()> {
    let steps = match std::env::args().nth(1) {
        Some(s) => s
            .parse()
            .map_err(|e| formers::Error::config("STEPS", format!("{s:?}: {e}")))?,
        None => 30,
    };
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs/reverse.json");
    let mut run = RunConfig::from_path(&path)?;
    run.train.steps = steps;
    run.train.batch_size = 16;
    // The config's warm-up is for 300 steps: keep it to a tenth of this shorter run.
    run.train.cap_warmup();
    let task = tasks::by_name("reverse", &run.model, &run.train)?;
    let mut trainer = Trainer::new(&run, task.as_ref())?;
    let before = trainer.evaluate()?;
    while !trainer.is_done() {
        let r = trainer.step()?;
        if r.step % 10 == 0 || r.step == r.total {
            println!(
                "step {:3}/{}: loss {:.4}, lr {:.5}",
                r.step, r.total, r.loss, r.lr
            );
        }
    }
    let after = trainer.evaluate()?;
    println!(
        "held-out loss {:.4} -> {:.4}, accuracy {:.1}% -> {:.1}% ({} parameters)",
        before.loss,
        after.loss,
        before.accuracy * 100.0,
        after.accuracy * 100.0,
        trainer.param_count()
    );
    Ok(())
}

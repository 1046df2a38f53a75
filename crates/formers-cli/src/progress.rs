//! Progress bars (indicatif) fed by the library's training observer.

use formers::train::Observer;
use formers::train::{EvalReport, StepReport};
use indicatif::{ProgressBar, ProgressStyle};

/// A bar over `total` items with a message and an ETA.
pub fn bar(total: u64, what: &str) -> ProgressBar {
    let pb = ProgressBar::new(total);
    pb.set_style(
        ProgressStyle::with_template(&format!(
            "{what} [{{bar:30}}] {{pos}}/{{len}} {{msg}} (ETA {{eta}})"
        ))
        .expect("valid template")
        .progress_chars("=> "),
    );
    pb
}

/// A spinner with a message, for work of unknown length.
pub fn spinner(what: &str) -> ProgressBar {
    let pb = ProgressBar::new_spinner();
    pb.set_message(what.to_string());
    pb.enable_steady_tick(std::time::Duration::from_millis(120));
    pb
}

/// Draws training progress: loss, throughput, ETA; prints evaluations above the bar.
pub struct TrainBar {
    pub pb: ProgressBar,
    pub quiet: bool,
}

impl Observer for TrainBar {
    fn on_step(&mut self, s: &StepReport) {
        if self.pb.length() != Some(s.total as u64) {
            self.pb.set_length(s.total as u64);
        }
        self.pb.set_position(s.step as u64);
        self.pb.set_message(format!(
            "loss {:.4} | lr {:.2e} | {:.0} tok/s",
            s.loss, s.lr, s.tokens_per_s
        ));
    }

    fn on_eval(&mut self, step: usize, e: &EvalReport) {
        let line = format!(
            "step {step}: eval loss {:.4}, accuracy {:.2}%",
            e.loss,
            e.accuracy * 100.0
        );
        if self.pb.is_hidden() {
            if !self.quiet {
                eprintln!("{line}");
            }
        } else {
            self.pb.println(line);
        }
    }
}

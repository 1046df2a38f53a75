//! One case of a property test: a loader run on an input in its own thread, with a panic,
//! a message-less error or a run past [`LIMIT`] turned into a failure that shows the input.

use std::panic::{self, AssertUnwindSafe};
use std::sync::mpsc;
use std::time::Duration;

use super::Outcome;

/// How long one case may take (a debug build, on a loaded machine).
pub const LIMIT: Duration = Duration::from_secs(20);

/// Runs `load` on `input` in a thread: a panic, a message-less error or a run past
/// [`LIMIT`] fails the case, naming the input.
pub fn guarded(
    input: &[u8],
    load: impl FnOnce(&[u8]) -> Outcome + Send + 'static,
) -> Result<(), String> {
    let shown = String::from_utf8_lossy(&input[..input.len().min(600)]).into_owned();
    let owned = input.to_vec();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let r = panic::catch_unwind(AssertUnwindSafe(|| load(&owned)));
        let _ = tx.send(r);
    });
    match rx.recv_timeout(LIMIT) {
        Ok(Ok(Ok(()))) => Ok(()),
        Ok(Ok(Err(msg))) if !msg.trim().is_empty() => Ok(()),
        Ok(Ok(Err(_))) => Err(format!("an empty error for {shown:?}")),
        Ok(Err(p)) => {
            let what = p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            Err(format!("panic `{what}` for {shown:?}"))
        }
        Err(_) => Err(format!("no answer within {LIMIT:?} for {shown:?}")),
    }
}

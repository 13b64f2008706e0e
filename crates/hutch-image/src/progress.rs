//! Reporting build stages to a person: a spinner per stage with its elapsed time, or nothing.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};

/// Receives the stages of a build as they start. `stage` ends the previous stage.
pub trait Progress {
    fn stage(&self, msg: &str);
    /// The build is over (successfully or not).
    fn finish(&self);
}

/// Reports nothing.
#[derive(Debug, Default, Clone, Copy)]
pub struct SilentProgress;

impl Progress for SilentProgress {
    fn stage(&self, _msg: &str) {}
    fn finish(&self) {}
}

/// A terminal spinner per stage; each finished stage stays on screen as
/// `✓ <stage> (<seconds>)`. Also remembers each stage's duration.
#[derive(Debug, Default)]
pub struct SpinnerProgress {
    state: Mutex<SpinnerState>,
}

#[derive(Debug, Default)]
struct SpinnerState {
    current: Option<(ProgressBar, String, Instant)>,
    done: Vec<(String, Duration)>,
}

impl SpinnerProgress {
    pub fn new() -> Self {
        Self::default()
    }

    /// Every finished stage and how long it took, in order.
    pub fn timings(&self) -> Vec<(String, Duration)> {
        self.lock().done.clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, SpinnerState> {
        // A panic while holding this lock leaves only display state behind: keep going.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn end_current(state: &mut SpinnerState) {
        if let Some((bar, msg, started)) = state.current.take() {
            let took = started.elapsed();
            bar.finish_with_message(format!("✓ {msg} ({:.1}s)", took.as_secs_f64()));
            state.done.push((msg, took));
        }
    }
}

impl Progress for SpinnerProgress {
    fn stage(&self, msg: &str) {
        let mut state = self.lock();
        Self::end_current(&mut state);
        let bar = ProgressBar::new_spinner();
        let style = ProgressStyle::with_template("{spinner} {msg} ({elapsed})")
            .unwrap_or_else(|_| ProgressStyle::default_spinner());
        bar.set_style(style);
        bar.set_message(msg.to_owned());
        bar.enable_steady_tick(Duration::from_millis(120));
        state.current = Some((bar, msg.to_owned(), Instant::now()));
    }

    fn finish(&self) {
        Self::end_current(&mut self.lock());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spinner_records_stage_timings() {
        let p = SpinnerProgress::new();
        p.stage("one");
        p.stage("two");
        p.finish();
        p.finish();
        let names: Vec<String> = p.timings().into_iter().map(|(n, _)| n).collect();
        assert_eq!(names, ["one", "two"]);
    }
}

//! Progress bars for long work: checking a model file, loading its weights, benchmark steps and
//! requests. On a terminal they show how far, how fast and how long is left; when stderr is not
//! a terminal (a log file, CI, a service manager) they draw nothing, so logs hold only the
//! work's own lines.

use std::borrow::Cow;
use std::io::IsTerminal;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// One bar on stderr, cleared when dropped unless [`Progress::finish`] kept it.
pub struct Progress {
    bar: ProgressBar,
}

const BYTES_TEMPLATE: &str = "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec}, {eta} left";
const STEPS_TEMPLATE: &str = "{msg} [{bar:30}] {pos}/{len} {prefix}, {elapsed} spent, {eta} left";

impl Progress {
    /// A bar counting bytes out of `total`.
    pub fn bytes(total: u64, message: impl Into<Cow<'static, str>>) -> Self {
        Self::new(total, BYTES_TEMPLATE, "", message)
    }

    /// A bar counting `unit`s (steps, requests) out of `total`.
    pub fn steps(total: u64, unit: &'static str, message: impl Into<Cow<'static, str>>) -> Self {
        Self::new(total, STEPS_TEMPLATE, unit, message)
    }

    fn new(
        total: u64,
        template: &str,
        unit: &'static str,
        message: impl Into<Cow<'static, str>>,
    ) -> Self {
        Self::drawn_if(
            std::io::stderr().is_terminal(),
            total,
            template,
            unit,
            message,
        )
    }

    fn drawn_if(
        terminal: bool,
        total: u64,
        template: &str,
        unit: &'static str,
        message: impl Into<Cow<'static, str>>,
    ) -> Self {
        let target = if terminal {
            ProgressDrawTarget::stderr()
        } else {
            ProgressDrawTarget::hidden()
        };
        let bar = ProgressBar::with_draw_target(Some(total), target);
        // The templates are constants; a mistake in one shows as a plain bar, not a failure.
        let style = ProgressStyle::with_template(template)
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> ");
        bar.set_style(style);
        bar.set_prefix(unit);
        bar.set_message(message);
        if terminal {
            // Redraws the elapsed time and ETA while a long step runs (a thread of its own).
            bar.enable_steady_tick(Duration::from_millis(500));
        }
        Self { bar }
    }

    /// Whether the bar draws anything (stderr is a terminal).
    pub fn is_drawn(&self) -> bool {
        !self.bar.is_hidden()
    }

    pub fn advance(&self, by: u64) {
        self.bar.inc(by);
    }

    pub fn set_position(&self, position: u64) {
        self.bar.set_position(position);
    }

    pub fn set_message(&self, message: impl Into<Cow<'static, str>>) {
        self.bar.set_message(message);
    }

    /// Prints a line to stderr above the bar, whether or not the bar is drawn (the work's own
    /// record, which logs keep).
    pub fn println(&self, line: impl AsRef<str>) {
        self.bar.suspend(|| eprintln!("{}", line.as_ref()));
    }

    /// Leaves the bar, full, on the terminal with a last message.
    pub fn finish(self, message: impl Into<Cow<'static, str>>) {
        self.bar.finish_with_message(message);
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        if !self.bar.is_finished() {
            self.bar.finish_and_clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bar_is_not_drawn_when_stderr_is_not_a_terminal() {
        // The terminal case is tested through a pseudo-terminal in `tests/http_api.rs`
        // (`mezo fetch-model` under `script`).
        let progress = Progress::drawn_if(false, 10, STEPS_TEMPLATE, "steps", "training");
        assert!(!progress.is_drawn());
        progress.advance(3);
        progress.println("a line logs keep");
        assert_eq!(progress.bar.position(), 3);
    }
}

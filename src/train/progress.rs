//! Progress: a bar with step, loss, learning rate, images/s and ETA when
//! stderr is a terminal; plain log lines otherwise. Also the training run's
//! log lines outside the step loop (`log`).

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::io::IsTerminal;
use std::sync::atomic::{AtomicBool, Ordering};

/// Set on ranks other than 0: they train silently (rank 0 logs).
pub(super) static QUIET: AtomicBool = AtomicBool::new(false);

/// A line of the training run's log (rank 0's; see [`QUIET`]).
pub(super) fn log(msg: &str) {
    if !QUIET.load(Ordering::Relaxed) {
        crate::stderr_line(&format!("[clip-wgpu] {msg}"));
    }
}

pub struct Progress {
    bar: Option<ProgressBar>,
    last: std::cell::Cell<Option<std::time::Instant>>,
    /// No bar and no lines (data-parallel ranks other than 0).
    silent: bool,
}

impl Progress {
    pub fn new(total: u64, start: u64, enabled: bool) -> Progress {
        if !enabled || !std::io::stderr().is_terminal() {
            return Progress {
                bar: None,
                last: Default::default(),
                silent: false,
            };
        }
        let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
        bar.set_style(
            ProgressStyle::with_template("{bar:30} {pos}/{len} steps  {msg}  ETA {eta}")
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        bar.set_position(start);
        Progress {
            bar: Some(bar),
            last: Default::default(),
            silent: false,
        }
    }

    /// Neither a bar nor log lines.
    pub fn silent(total: u64, start: u64) -> Progress {
        Progress {
            silent: true,
            ..Progress::new(total, start, false)
        }
    }

    /// After optimizer step `step`, which trained on `images` pictures.
    pub fn step(&self, step: u64, loss: f64, lr: f64, images: usize) {
        let now = std::time::Instant::now();
        let rate = self
            .last
            .replace(Some(now))
            .map(|t| images as f64 / (now - t).as_secs_f64().max(1e-9));
        if let Some(b) = &self.bar {
            b.set_position(step);
            let ips = rate
                .map(|r| format!("  {r:.1} images/s"))
                .unwrap_or_default();
            b.set_message(format!("loss {loss:.4}  lr {lr:.2e}{ips}"));
        }
    }

    /// A line above the bar (or a plain line without one).
    pub fn log(&self, msg: &str) {
        if self.silent {
            return;
        }
        match &self.bar {
            Some(b) => b.println(format!("[clip-wgpu] {msg}")),
            None => crate::stderr_line(&format!("[clip-wgpu] {msg}")),
        }
    }

    pub fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}

//! What can stop a training run, and what the run does about it: signals,
//! faults injected by tests, and errors explained with where to go on from.
//!
//! - A NaN or infinite loss or gradient: the global gradient norm is read
//!   back every step (two floats) before the update; when it or the loss is
//!   not finite the run stops, naming the step and the parameters whose
//!   gradients are not finite, without updating the weights or saving
//!   anything (the latest checkpoint stays the last good state), or, with
//!   `--skip_nonfinite_steps`, skips that update and counts it (and stops
//!   after `--max_consecutive_nonfinite_steps`, default 10, skipped in a
//!   row). A checkpoint is never written from non-finite weights (see
//!   `step` and `save`).
//! - GPU out of memory: the error names the batch size and suggests a
//!   smaller one with gradient accumulation.
//! - A lost GPU device: every GPU call after it fails (wgpu's device-lost
//!   callback, readbacks that cannot map), so the run stops with the error
//!   where it stands; a save in progress fails before its rename, so the
//!   latest complete checkpoint is the one to resume from, and the message
//!   names it.
//! - SIGINT / SIGTERM (when the binary asked for it with
//!   [`catch_interrupts`]): a checkpoint at the end of the step in progress,
//!   then [`Interrupted`] (the binary exits with 128 + the signal number); a
//!   second signal exits at once.
//! - A kill at any moment: checkpoints are renamed into place complete; the
//!   `.checkpoint-N.tmp-PID` folder of a save cut short is removed by the next
//!   run, which resumes from the latest complete checkpoint.
//!
//! Tests inject faults through the `CLIP_WGPU_FAULTS` environment variable:
//! comma-separated `KIND@STEP` with KIND one of `nan_grad` (optionally
//! `nan_grad:NAME`, the first parameter whose name contains NAME),
//! `nan_loss` (the step's loss and first gradient NaN, as an f16 forward
//! that overflowed leaves them), `oom` (an
//! allocation past the adapter's buffer limit), `device_lost` (the device is
//! destroyed at the start of that step), `device_lost_at_save` (destroyed
//! just before that step's checkpoint is written), `hold_at_interrupt` (any
//! step: after SIGINT / SIGTERM, wait at the step boundary, having logged
//! so, for a second signal) or `wait_for_signal` (after that step, log so
//! and wait for SIGINT / SIGTERM: a test signals a job at a known step).

use super::accumulate::AccumulationLoss;
use super::args::TrainArgs;
use super::checkpoint;
use super::progress::{log, QUIET};
use crate::model::params::ParamStore;
use crate::tensor::Tensor;
use crate::Gpu;
use anyhow::{ensure, Context, Result};
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::time::Instant;

// ---------------------------------------------------------------------------
// Interruption: SIGINT and SIGTERM ask for a checkpoint at the next step
// boundary; a second one exits at once.

/// The first signal received (0: none).
static SIGNAL: AtomicI32 = AtomicI32::new(0);
/// Set by [`catch_interrupts`]: training installs the handlers.
static CATCH: AtomicBool = AtomicBool::new(false);
static ARMED: AtomicBool = AtomicBool::new(false);

/// Ask `train` to catch SIGINT (Ctrl-C) and SIGTERM once training starts:
/// the first one saves a checkpoint at the end of the step in progress and
/// stops the run with [`Interrupted`]; a second one exits at once with
/// 128 + its number. Before training starts (loading the model and the
/// data) the signals keep their default effect, as there is nothing to
/// save. The binary calls this; a program using the library keeps its own
/// handlers unless it does. No effect outside Unix.
pub fn catch_interrupts() {
    CATCH.store(true, Ordering::SeqCst);
}

/// The signal that asked the run to stop, if one did.
pub fn interrupted() -> Option<i32> {
    match SIGNAL.load(Ordering::SeqCst) {
        0 => None,
        s => Some(s),
    }
}

/// From here on SIGINT / SIGTERM mean: checkpoint at the step's end, stop
/// (if the binary asked for it).
pub(super) fn arm_interrupts() {
    if CATCH.load(Ordering::SeqCst) && !ARMED.swap(true, Ordering::SeqCst) {
        install_handlers();
    }
}

#[cfg(unix)]
extern "C" fn on_signal(sig: libc::c_int) {
    // Async-signal-safe only: atomics, write(2) and _exit(2).
    let first = SIGNAL
        .compare_exchange(0, sig, Ordering::SeqCst, Ordering::SeqCst)
        .is_ok();
    if first && QUIET.load(Ordering::Relaxed) {
        return; // rank 0 says so for the job
    }
    let msg: &[u8] = if first {
        b"\n[clip-wgpu] interrupted: saving a checkpoint at the end of this step \
          (interrupt again to stop at once)\n"
    } else {
        b"\n[clip-wgpu] second interrupt: stopping now, without a checkpoint of this step\n"
    };
    unsafe {
        libc::write(2, msg.as_ptr().cast(), msg.len());
        if !first {
            libc::_exit(128 + sig);
        }
    }
}

#[cfg(unix)]
fn install_handlers() {
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SA_RESTART: system calls in progress (file writes, waits for the
        // GPU) carry on instead of failing with EINTR.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
            libc::sigemptyset(&mut sa.sa_mask);
            sa.sa_flags = libc::SA_RESTART;
            if libc::sigaction(sig, &sa, std::ptr::null_mut()) != 0 {
                log(&format!(
                    "could not install a handler for signal {sig}: {}",
                    std::io::Error::last_os_error()
                ));
            }
        }
    }
}

#[cfg(not(unix))]
fn install_handlers() {}

fn signal_name(sig: i32) -> String {
    match sig {
        2 => "SIGINT".into(),
        15 => "SIGTERM".into(),
        s => format!("signal {s}"),
    }
}

/// A run stopped by SIGINT or SIGTERM (after saving what there was to save;
/// the message says where and how to resume).
#[derive(Debug)]
pub struct Interrupted {
    pub signal: i32,
    pub message: String,
}

impl Interrupted {
    /// The shell's convention for a process ended by a signal.
    pub fn exit_code(&self) -> i32 {
        128 + self.signal
    }
}

impl std::fmt::Display for Interrupted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "interrupted by {}: {}",
            signal_name(self.signal),
            self.message
        )
    }
}

impl std::error::Error for Interrupted {}

// ---------------------------------------------------------------------------
// Fault injection for tests (CLIP_WGPU_FAULTS; see the module doc).

#[derive(Default)]
pub(super) struct Faults(Vec<(String, String, u64)>);

impl Faults {
    pub(super) fn from_env() -> Result<Faults> {
        let Ok(spec) = std::env::var("CLIP_WGPU_FAULTS") else {
            return Ok(Faults::default());
        };
        let mut out = Vec::new();
        for item in spec.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let (what, step) = item
                .split_once('@')
                .with_context(|| format!("CLIP_WGPU_FAULTS: {item:?} is not KIND@STEP"))?;
            let step: u64 = step
                .parse()
                .with_context(|| format!("CLIP_WGPU_FAULTS: bad step in {item:?}"))?;
            let (kind, arg) = what.split_once(':').unwrap_or((what, ""));
            ensure!(
                [
                    "nan_grad",
                    "nan_loss",
                    "oom",
                    "device_lost",
                    "device_lost_at_save",
                    "hold_at_interrupt",
                    "wait_for_signal"
                ]
                .contains(&kind),
                "CLIP_WGPU_FAULTS: unknown fault {kind:?}"
            );
            out.push((kind.to_string(), arg.to_string(), step));
        }
        if !out.is_empty() {
            log(&format!("injecting faults for a test: {spec}"));
        }
        Ok(Faults(out))
    }

    /// Whether fault `kind` is asked for at any step.
    pub(super) fn has(&self, kind: &str) -> bool {
        self.0.iter().any(|(k, _, _)| k == kind)
    }

    /// The argument of fault `kind` at optimizer step `step`, if it strikes.
    pub(super) fn at(&self, kind: &str, step: u64) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _, s)| k == kind && *s == step)
            .map(|(_, a, _)| a.as_str())
    }

    /// `device_lost` and `oom` at the start of step `step_no` (its first
    /// batch read).
    pub(super) fn before_step(&self, step_no: u64, gpu: &std::sync::Arc<Gpu>) -> Result<()> {
        if self.at("device_lost", step_no).is_some() {
            gpu.device.destroy();
        }
        if self.at("oom", step_no).is_some() {
            // A real allocation failure: past the adapter's limit.
            let n = (gpu.limits.max_buffer_size / 4 + 1) as usize;
            Tensor::empty(gpu, &[n])?;
        }
        Ok(())
    }

    /// `nan_grad[:NAME]` at step `step_no`: NaN into the gradient of the
    /// first parameter (with a gradient) whose name contains NAME (the
    /// first with a gradient for `nan_loss`).
    pub(super) fn poison_gradient(
        &self,
        step_no: u64,
        params: &ParamStore,
        grads: &[Option<Tensor>],
    ) -> Result<()> {
        let Some(name) = self
            .at("nan_grad", step_no)
            .or(self.at("nan_loss", step_no).map(|_| ""))
        else {
            return Ok(());
        };
        let (p, g) = params
            .params
            .iter()
            .zip(grads)
            .find(|(p, g)| g.is_some() && p.name.contains(name))
            .with_context(|| format!("CLIP_WGPU_FAULTS: no gradient named like {name:?}"))?;
        let g = g.as_ref().unwrap();
        log(&format!("injecting NaN into the gradient of {}", p.name));
        g.write(&vec![f32::NAN; g.numel()])
    }

    /// `device_lost_at_save` at step `step`: the device is destroyed just
    /// before the checkpoint is written.
    pub(super) fn before_save(&self, step: u64, gpu: &Gpu) {
        if self.at("device_lost_at_save", step).is_some() {
            gpu.device.destroy();
        }
    }

    /// `wait_for_signal` after step `step`, with no signal yet: say so and
    /// wait for SIGINT / SIGTERM. Whether it waited.
    pub(super) fn wait_for_signal(&self, step: u64) -> bool {
        if self.at("wait_for_signal", step).is_none() || interrupted().is_some() {
            return false;
        }
        log(&format!(
            "waiting for a signal after step {step} (test fault)"
        ));
        while interrupted().is_none() {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        true
    }

    /// `hold_at_interrupt`: for a test of the second signal, stay at this
    /// step boundary (say so first) until it arrives.
    pub(super) fn hold_at_interrupt(&self) {
        if self.has("hold_at_interrupt") {
            log("holding at the step boundary of an interrupt (test fault)");
            let t0 = Instant::now();
            while t0.elapsed().as_secs() < 600 {
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
        }
    }
}

/// SIGTERM's number: a stop another rank was asked for (mpirun passes the
/// job's SIGTERM to every rank; a scheduler may signal one).
pub(super) const SIGTERM: i32 = 15;

// ---------------------------------------------------------------------------
// Errors that stop training, explained.

/// Where training stood when an error stopped it.
#[derive(Default)]
pub(super) struct Whereabouts {
    /// The step loop has begun (errors before it are set-up errors).
    pub(super) started: bool,
    /// Optimizer steps completed.
    pub(super) step: u64,
    /// Inside an evaluation during training.
    pub(super) evaluating: bool,
    /// Writing the checkpoint of step `step`.
    pub(super) saving: bool,
}

fn chain_text(e: &anyhow::Error) -> String {
    format!("{e:#}").to_lowercase()
}

pub(super) fn is_oom(e: &anyhow::Error) -> bool {
    let t = chain_text(e);
    t.contains("out of memory") || t.contains("max_buffer_size")
}

fn is_device_lost(e: &anyhow::Error, gpu: &Gpu) -> bool {
    let lost = |t: &str| t.contains("device lost") || t.contains("device is lost");
    lost(&chain_text(e)) || gpu.check().is_err_and(|g| lost(&chain_text(&g)))
}

pub(super) fn resume_note(args: &TrainArgs) -> String {
    match checkpoint::latest_checkpoint(&args.output_dir) {
        Some(p) => format!(
            "the latest checkpoint, {}, is intact: run the same command again to resume from it",
            p.display()
        ),
        None => format!(
            "no checkpoint has been saved in {} yet",
            args.output_dir.display()
        ),
    }
}

/// What to do about an out-of-memory error at batch `bs` x `accum`. For
/// training it names what keeps the contrastive batch: more accumulation
/// steps (with the full-batch loss every pair of a step stays in the loss)
/// and gradient checkpointing, rather than a smaller batch alone, which
/// would silently change the loss.
pub(super) fn oom_advice(
    flag: &str,
    bs: usize,
    accum: usize,
    max_len: usize,
    args: &TrainArgs,
) -> String {
    let smaller = (bs / 2).max(1);
    let at = format!("the GPU ran out of memory at --{flag} {bs} (text length {max_len})");
    if flag != "per_device_train_batch_size" {
        return format!("{at}: try --{flag} {smaller}, or a shorter --max_seq_length");
    }
    let mut ways = Vec::new();
    if bs > 1 {
        let keep = bs * accum;
        let steps = accum * bs.div_ceil(smaller);
        ways.push(match args.accumulation_loss {
            AccumulationLoss::Full => format!(
                "--{flag} {smaller} with --gradient_accumulation_steps {steps}: the contrastive loss \
                 stays one loss over all {keep} pairs of a step (--accumulation_loss full)"
            ),
            AccumulationLoss::Micro => format!(
                "--{flag} {smaller} with --gradient_accumulation_steps {steps} and --accumulation_loss full \
                 (the default) to keep one contrastive loss over all {keep} pairs of a step; with \
                 --accumulation_loss micro each loss would see only {smaller}"
            ),
        });
    }
    if !args.gradient_checkpointing {
        ways.push(
            "--gradient_checkpointing (each encoder layer's activations are recomputed in the \
             backward instead of kept)"
                .into(),
        );
    }
    ways.push("a shorter --max_seq_length".into());
    format!("{at}: try {}", ways.join("; or "))
}

/// An error that stopped training, with what it means and where to go on
/// from.
pub(super) fn explain_stop(
    e: anyhow::Error,
    args: &TrainArgs,
    gpu: &Gpu,
    at: &Whereabouts,
    max_len: usize,
) -> anyhow::Error {
    if !at.started || e.is::<Interrupted>() || e.is::<NonFinite>() {
        return e;
    }
    let step = at.step + 1;
    let note = resume_note(args);
    let when = if at.saving {
        format!("while saving the checkpoint of step {}", at.step)
    } else if at.evaluating {
        format!("in the evaluation after step {}", at.step)
    } else {
        format!("during training step {step}")
    };
    let msg = if is_device_lost(&e, gpu) {
        format!(
            "the GPU device was lost {when} (a driver reset or crash, a GPU removed, \
             or the system stopping a kernel that ran too long): the weights on it are gone and nothing \
             after the latest checkpoint was saved; {note}"
        )
    } else if is_oom(&e) {
        let advice = if at.evaluating {
            oom_advice(
                "per_device_eval_batch_size",
                args.per_device_eval_batch_size,
                1,
                max_len,
                args,
            )
        } else {
            oom_advice(
                "per_device_train_batch_size",
                args.per_device_train_batch_size,
                args.gradient_accumulation_steps.max(1),
                max_len,
                args,
            )
        };
        format!("{advice} ({when}); {note}")
    } else {
        format!("training stopped {when}; {note}")
    };
    e.context(msg)
}

/// A non-finite loss or gradient that stopped the run (the message says
/// which step and which tensors).
#[derive(Debug)]
pub struct NonFinite(pub String);

impl std::fmt::Display for NonFinite {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for NonFinite {}

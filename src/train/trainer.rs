//! `clip-wgpu train`: run_clip.py's workflow. Load (or randomly initialise)
//! a model, read the data, train with AdamW and the chosen schedule, evaluate
//! (loss and retrieval recall@K), checkpoint, resume, and save a model that
//! transformers loads.
//!
//! Faults, and what a run does about them:
//! - A NaN or infinite loss or gradient: the global gradient norm is read
//!   back every step (two floats) before the update; when it or the loss is
//!   not finite the run stops, naming the step and the parameters whose
//!   gradients are not finite, without updating the weights or saving
//!   anything (the latest checkpoint stays the last good state), or, with
//!   `--skip_nonfinite_steps`, skips that update and counts it (and stops
//!   after `--max_consecutive_nonfinite_steps`, default 10, skipped in a
//!   row). A checkpoint is never written from non-finite weights.
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
//! `nan_grad:NAME`, the first parameter whose name contains NAME), `oom` (an
//! allocation past the adapter's buffer limit), `device_lost` (the device is
//! destroyed at the start of that step), `device_lost_at_save` (destroyed
//! just before that step's checkpoint is written), `hold_at_interrupt` (any
//! step: after SIGINT / SIGTERM, wait at the step boundary, having logged
//! so, for a second signal) or `wait_for_signal` (after that step, log so
//! and wait for SIGINT / SIGTERM: a test signals a job at a known step).

use crate::data::loader::{epoch_order, LoadedBatch, Loader, LoaderConfig};
use crate::data::sources::{self, Dataset, Example, Split};
use crate::data::{demo, ImageProcessorConfig, TextTokenizer};
use crate::dist::{self, EpochShards, World};
use crate::model::clip::{Batch, ClipModel};
use crate::model::config::ModelConfig;
use crate::model::init::init_weights;
use crate::model::params::ParamStore;
use crate::model::weights::write_atomic;
use crate::ops::adamw::{grad_norm, AdamW};
use crate::ops::clamp::clamp_inplace;
use crate::ops::reduce::sumsq;
use crate::tape::Tape;
use crate::tensor::Tensor;
use crate::train::accumulate::{full_batch_grads, group_grads, AccumulationLoss, MicroBatches};
use crate::train::args::{DataSource, Resume, TrainArgs};
use crate::train::checkpoint::{self, ProcessingFiles, RunState};
use crate::train::metrics::{loss_curve_png, recall_at_k, ChartData, MetricsLog};
use crate::train::optimizer::Optimizer;
use crate::train::schedule::Schedule;
use crate::Gpu;
use anyhow::{bail, ensure, Context, Result};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::Arc;
use std::time::Instant;

/// OpenCLIP's guard: logit_scale <= ln(100) (run_clip.py has none).
const MAX_LOGIT_SCALE: f32 = 4.605_170_2;

/// Everything a run needs besides the arguments.
pub struct Setup {
    pub model: ClipModel,
    pub tokenizer: Arc<TextTokenizer>,
    pub processor: ImageProcessorConfig,
    pub processing: ProcessingFiles,
    pub train: Vec<Example>,
    pub eval: Vec<Example>,
    pub max_len: usize,
    /// The built-in demo (no model and no data flags).
    pub demo: bool,
}

/// Files of the built-in demo model, embedded in the binary.
const DEMO_FILES: &[(&str, &[u8])] = &[
    (
        "config.json",
        include_bytes!("../../assets/demo/config.json"),
    ),
    (
        "processor_config.json",
        include_bytes!("../../assets/demo/processor_config.json"),
    ),
    (
        "tokenizer.json",
        include_bytes!("../../assets/clip-tokenizer/tokenizer.json"),
    ),
    (
        "tokenizer_config.json",
        include_bytes!("../../assets/clip-tokenizer/tokenizer_config.json"),
    ),
];

/// Set on ranks other than 0: they train silently (rank 0 logs).
static QUIET: AtomicBool = AtomicBool::new(false);

fn log(msg: &str) {
    if !QUIET.load(Ordering::Relaxed) {
        crate::stderr_line(&format!("[clip-wgpu] {msg}"));
    }
}

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

fn arm_interrupts() {
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
struct Faults(Vec<(String, String, u64)>);

impl Faults {
    fn from_env() -> Result<Faults> {
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
    fn has(&self, kind: &str) -> bool {
        self.0.iter().any(|(k, _, _)| k == kind)
    }

    /// The argument of fault `kind` at optimizer step `step`, if it strikes.
    fn at(&self, kind: &str, step: u64) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _, s)| k == kind && *s == step)
            .map(|(_, a, _)| a.as_str())
    }
}

// ---------------------------------------------------------------------------
// Numerical checks.

/// Sums of squares of the given tensors, one small readback each (only on
/// the failure path): the names of those that are not finite.
fn nonfinite_tensors<'a>(
    named: impl Iterator<Item = (&'a str, &'a Tensor)>,
) -> Result<Vec<String>> {
    let mut bad = Vec::new();
    for (name, t) in named {
        let ss = sumsq(t)?.to_vec()?[0];
        if !ss.is_finite() {
            let what = if ss.is_nan() {
                "NaN"
            } else {
                "inf or overflow"
            };
            bad.push(format!("{name} ({what})"));
        }
    }
    Ok(bad)
}

fn list_names(names: &[String]) -> String {
    const SHOWN: usize = 6;
    let mut s = names[..names.len().min(SHOWN)].join(", ");
    if names.len() > SHOWN {
        s += &format!(" and {} more", names.len() - SHOWN);
    }
    s
}

/// What is not finite in a step: the loss and/or the gradients, by name.
fn nonfinite_report(
    params: &ParamStore,
    grads: &[Option<Tensor>],
    loss: f64,
    norm: f32,
) -> Result<String> {
    let bad = nonfinite_tensors(
        params
            .params
            .iter()
            .zip(grads)
            .filter_map(|(p, g)| Some((p.name.as_str(), g.as_ref()?))),
    )?;
    let mut parts = Vec::new();
    if !loss.is_finite() {
        parts.push(format!("the loss is {loss}"));
    }
    if !norm.is_finite() {
        if bad.is_empty() {
            parts.push(format!("the global gradient norm is {norm}"));
        } else {
            parts.push(format!(
                "the global gradient norm is {norm}, from non-finite gradients of {}",
                list_names(&bad)
            ));
        }
    } else if !loss.is_finite() {
        parts.push("the gradients are finite".into());
    }
    Ok(parts.join("; "))
}

/// Refuse to save weights that are not all finite (one small readback: the
/// norm of all weights; the names only when it is not finite).
fn check_finite_weights(params: &ParamStore) -> Result<()> {
    let all: Vec<&Tensor> = params.params.iter().map(|p| &p.tensor).collect();
    let norm = grad_norm(&all, f32::INFINITY)?.to_vec()?[0];
    if norm.is_finite() {
        return Ok(());
    }
    let bad = nonfinite_tensors(params.params.iter().map(|p| (p.name.as_str(), &p.tensor)))?;
    bail!(
        "refusing to save non-finite weights ({}): the latest checkpoint is left as it was",
        if bad.is_empty() {
            format!("weight norm {norm}")
        } else {
            list_names(&bad)
        }
    )
}

/// How the run that saved a checkpoint (its recorded `run`) differs from
/// this one in what fixes the data order: (what, now) pairs, compared with
/// the checkpoint's train_examples, batch_size x world_size and
/// gradient_accumulation_steps. Checkpoints that predate the record pass.
fn resume_differences(run: &Value, now: &[(&str, usize); 3]) -> Vec<String> {
    let get = |k: &str| run.get(k).and_then(Value::as_u64).map(|v| v as usize);
    let world = get("world_size").unwrap_or(1);
    let was = [
        get("train_examples"),
        get("batch_size").map(|b| b * world),
        get("gradient_accumulation_steps"),
    ];
    was.iter()
        .zip(now)
        .filter_map(|(w, (what, n))| {
            let w = (*w)?;
            (w != *n).then(|| format!("the checkpoint's run had {w} {what}, this one has {n}"))
        })
        .collect()
}

/// SIGTERM's number: a stop another rank was asked for (mpirun passes the
/// job's SIGTERM to every rank; a scheduler may signal one).
const SIGTERM: i32 = 15;

/// Fail unless every rank holds the same weights after `step` steps: the
/// norm of all weights and logit_scale, compared bit for bit (one small
/// readback and one gather).
fn check_replicas(world: &World, params: &ParamStore, step: u64) -> Result<()> {
    let all: Vec<&Tensor> = params.params.iter().map(|p| &p.tensor).collect();
    let norm = grad_norm(&all, f32::INFINITY)?.to_vec()?[0];
    let ls = params
        .index_of("logit_scale")
        .map(|i| params.params[i].tensor.to_vec())
        .transpose()?
        .map_or(0.0, |v| v[0]);
    let mine = [norm, ls];
    for (r, theirs) in world.all_gather_f32(&mine).iter().enumerate() {
        let same = theirs.len() == 2
            && theirs[0].to_bits() == norm.to_bits()
            && theirs[1].to_bits() == ls.to_bits();
        ensure!(
            same,
            "the ranks' weights differ after step {step}: rank {} has weight norm {norm} and logit_scale {ls}, \
             rank {r} has {theirs:?} (a rank computed something else: different data, adapter results or code)",
            world.rank()
        );
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Errors that stop training, explained.

/// Where training stood when an error stopped it.
#[derive(Default)]
struct Whereabouts {
    /// The step loop has begun (errors before it are set-up errors).
    started: bool,
    /// Optimizer steps completed.
    step: u64,
    /// Inside an evaluation during training.
    evaluating: bool,
    /// Writing the checkpoint of step `step`.
    saving: bool,
}

fn chain_text(e: &anyhow::Error) -> String {
    format!("{e:#}").to_lowercase()
}

fn is_oom(e: &anyhow::Error) -> bool {
    let t = chain_text(e);
    t.contains("out of memory") || t.contains("max_buffer_size")
}

fn is_device_lost(e: &anyhow::Error, gpu: &Gpu) -> bool {
    let lost = |t: &str| t.contains("device lost") || t.contains("device is lost");
    lost(&chain_text(e)) || gpu.check().is_err_and(|g| lost(&chain_text(&g)))
}

fn resume_note(args: &TrainArgs) -> String {
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
fn oom_advice(flag: &str, bs: usize, accum: usize, max_len: usize, args: &TrainArgs) -> String {
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
fn explain_stop(
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

fn note_skips(d: &Dataset, what: &str) {
    if let Some(s) = d.skip_summary(what) {
        log(&s);
    }
}

fn truncate(mut v: Vec<Example>, max: Option<usize>) -> Vec<Example> {
    if let Some(m) = max {
        v.truncate(m);
    }
    v
}

/// Resolve the model, tokenizer, processor and data the arguments name.
pub fn setup(args: &TrainArgs, gpu: &Arc<Gpu>) -> Result<Setup> {
    args.check_paths()?;
    let source = args.data_source()?;
    let demo = matches!(source, DataSource::Demo)
        && args.model_name_or_path.is_none()
        && args.config_name.is_none();
    // Model, and the folder its tokenizer/processor files come from.
    let (model, files_dir) = if let Some(m) = &args.model_name_or_path {
        (ClipModel::load(gpu, m)?, m.clone())
    } else {
        let (config, dir) = if let Some(c) = &args.config_name {
            let file = if c.is_dir() {
                c.join("config.json")
            } else {
                c.clone()
            };
            let dir = file.parent().map(Path::to_path_buf).unwrap_or_default();
            (ModelConfig::from_file(&file)?, dir)
        } else {
            // The built-in demo model (assets/demo), or a random CLIP of
            // that shape when only data is given.
            let dir = std::env::temp_dir().join(format!("clip-wgpu-demo-{}", std::process::id()));
            std::fs::create_dir_all(&dir)?;
            for (name, bytes) in DEMO_FILES {
                std::fs::write(dir.join(name), bytes)?;
            }
            (ModelConfig::from_file(&dir.join("config.json"))?, dir)
        };
        let w = init_weights(&config, args.seed)?;
        (
            ClipModel::from_weights(gpu, config, &w, "random initialisation")?,
            dir,
        )
    };
    let tok_dir = args
        .tokenizer_name
        .clone()
        .unwrap_or_else(|| files_dir.clone());
    let tokenizer = Arc::new(TextTokenizer::from_model_dir(&tok_dir)?);
    let proc_dir = args
        .image_processor_name
        .clone()
        .unwrap_or_else(|| files_dir.clone());
    let processor = ImageProcessorConfig::from_model_dir(&proc_dir)?;
    let s = model.config.vision.image_size;
    ensure!(
        processor.crop_h == s && processor.crop_w == s,
        "the image processor in {} crops to {}x{} but the model takes {s}x{s} images",
        proc_dir.display(),
        processor.crop_h,
        processor.crop_w
    );
    let mut processing = ProcessingFiles::from_dir(&files_dir)?;
    if tok_dir != files_dir {
        processing
            .files
            .extend(ProcessingFiles::from_dir(&tok_dir)?.files);
    }
    let positions = model.config.text.max_positions();
    let mut max_len = args.max_seq_length;
    if max_len > positions {
        log(&format!(
            "--max_seq_length {max_len} is longer than the model's {positions} positions: using {positions}"
        ));
        max_len = positions;
    }
    // Data.
    let read_table = |f: &Option<PathBuf>, what: &str| -> Result<Vec<Example>> {
        match f {
            None => Ok(Vec::new()),
            Some(f) => {
                let d = if f.is_dir() {
                    sources::sidecar_folder(f)?
                } else {
                    sources::table(f, &args.image_column, &args.caption_column)?
                };
                note_skips(&d, what);
                Ok(d.examples)
            }
        }
    };
    let (train, eval) = match source {
        DataSource::Coco { data_dir, .. } => {
            let tr = if args.do_train {
                sources::coco(&data_dir, Split::Train)?
            } else {
                Dataset::default()
            };
            let ev = if args.do_eval {
                sources::coco(&data_dir, Split::Validation)?
            } else {
                Dataset::default()
            };
            note_skips(&tr, "COCO train");
            note_skips(&ev, "COCO validation");
            (tr.examples, ev.examples)
        }
        DataSource::Files { train, validation } => (
            read_table(&train, "train file")?,
            read_table(&validation, "validation file")?,
        ),
        DataSource::Folder { dir } => {
            // A folder of pictures with captions: hold out 10% of the images.
            let d = sources::sidecar_folder(&dir)?;
            note_skips(&d, &dir.display().to_string());
            let (tr, ev) = sources::split_holdout(d.examples, 0.1, args.seed);
            log(&format!(
                "{}: {} training and {} held-out examples",
                dir.display(),
                tr.len(),
                ev.len()
            ));
            (tr, ev)
        }
        DataSource::Demo => (
            demo::examples(args.demo_train_samples, args.seed),
            demo::held_out(args.demo_eval_samples, args.seed),
        ),
    };
    Ok(Setup {
        model,
        tokenizer,
        processor,
        processing,
        train: truncate(train, args.max_train_samples),
        eval: truncate(eval, args.max_eval_samples),
        max_len,
        demo,
    })
}

fn to_batch(gpu: &Arc<Gpu>, b: &LoadedBatch, s: usize) -> Result<Batch> {
    Ok(Batch {
        pixels: Tensor::from_slice(gpu, &b.pixels, &[b.batch, 3, s, s])?,
        ids: b.ids.clone(),
        mask: b.mask.clone(),
        batch: b.batch,
    })
}

/// Host bytes an accumulated step's pictures may keep for pass 2
/// (`CLIP_WGPU_GROUP_HOST_MIB`, default 1024 MiB).
fn group_host_bytes() -> Result<usize> {
    match std::env::var("CLIP_WGPU_GROUP_HOST_MIB") {
        Err(_) => Ok(1024 << 20),
        Ok(v) => v.trim().parse::<usize>().map(|m| m << 20).map_err(|_| {
            anyhow::anyhow!("CLIP_WGPU_GROUP_HOST_MIB={v:?} is not a whole number of MiB")
        }),
    }
}

/// Full-batch accumulation's micro-batches, pulled from the epoch's loader
/// in pass 1. Their pictures wait on the host for pass 2 up to
/// `CLIP_WGPU_GROUP_HOST_MIB` (default 1024 MiB); past it, the rest are
/// decoded again for pass 2 by a second loader started where they began,
/// so a group of any size needs no more host memory than that.
struct GroupStream<'a> {
    ld: &'a mut Loader,
    first: Option<(LoadedBatch, usize)>,
    max: usize,
    /// The group's batches (pixels dropped from those not kept) and the
    /// loader position each began at.
    taken: Vec<LoadedBatch>,
    starts: Vec<usize>,
    kept: Vec<bool>,
    room: usize,
    replay: Option<Loader>,
    reopen: &'a dyn Fn(usize) -> Result<Loader>,
    gpu: &'a Arc<Gpu>,
    s: usize,
}

impl<'a> GroupStream<'a> {
    #[allow(clippy::too_many_arguments)]
    fn new(
        ld: &'a mut Loader,
        first: LoadedBatch,
        first_start: usize,
        max: usize,
        gpu: &'a Arc<Gpu>,
        s: usize,
        reopen: &'a dyn Fn(usize) -> Result<Loader>,
        room: usize,
    ) -> GroupStream<'a> {
        GroupStream {
            ld,
            first: Some((first, first_start)),
            max,
            taken: Vec::new(),
            starts: Vec::new(),
            kept: Vec::new(),
            room,
            replay: None,
            reopen,
            gpu,
            s,
        }
    }
}

impl MicroBatches for GroupStream<'_> {
    fn next(&mut self) -> Result<Option<Batch>> {
        if self.taken.len() == self.max {
            return Ok(None);
        }
        let (mut b, start) = match self.first.take() {
            Some(f) => f,
            None => {
                let start = Loader::position(self.ld);
                match self.ld.next_batch()? {
                    Some(b) => (b, start),
                    None => return Ok(None),
                }
            }
        };
        let batch = to_batch(self.gpu, &b, self.s)?;
        // Keep a prefix of the group (the replay then starts at the first
        // batch not kept and reads on from there).
        let bytes = b.pixels.len() * 4;
        let keep = self.kept.last().is_none_or(|&k| k) && bytes <= self.room;
        if keep {
            self.room -= bytes;
        } else {
            b.pixels = Vec::new();
        }
        self.kept.push(keep);
        self.taken.push(b);
        self.starts.push(start);
        Ok(Some(batch))
    }

    fn again(&mut self, i: usize) -> Result<Batch> {
        if self.kept[i] {
            return to_batch(self.gpu, &self.taken[i], self.s);
        }
        if self.replay.is_none() {
            self.replay = Some((self.reopen)(self.starts[i])?);
        }
        let r = self
            .replay
            .as_mut()
            .unwrap()
            .next_batch()?
            .context("decoding a step's pictures again: the data ended early")?;
        let b = &self.taken[i];
        ensure!(
            r.batch == b.batch && r.ids == b.ids,
            "decoding a step's pictures again gave another batch (were the data files changed during training?)"
        );
        to_batch(self.gpu, &r, self.s)
    }
}

/// How a loader cuts its order into batches (see [`LoaderConfig`]).
#[derive(Clone, Copy)]
struct Batching {
    size: usize,
    drop_last: bool,
    refill: bool,
}

fn loader(
    setup: &Setup,
    examples: &Arc<Vec<Example>>,
    order: Vec<usize>,
    start: usize,
    args: &TrainArgs,
    how: Batching,
) -> Result<Loader> {
    let Batching {
        size: batch,
        drop_last,
        refill,
    } = how;
    Loader::new(
        examples.clone(),
        order,
        start,
        LoaderConfig {
            batch_size: batch,
            max_len: setup.max_len,
            workers: args.workers.max(1),
            prefetch: 4,
            drop_last,
            refill,
        },
        setup.processor.clone(),
        setup.tokenizer.clone(),
    )
}

pub struct EvalResult {
    pub loss: f64,
    /// (name, value), e.g. ("i2t_recall@1", 0.42).
    pub recall: Vec<(String, f64)>,
    pub samples: usize,
    pub runtime_s: f64,
}

/// eval_loss (mean over examples of the per-batch contrastive loss, as the
/// Trainer averages it) and retrieval recall@1/5/10 in both directions, an
/// image counting once however many captions it has.
///
/// Across ranks each evaluates a contiguous shard of the examples and the
/// embeddings are gathered, so recall@K is over the whole set, as one
/// process computes it (the loss is per batch of a rank's shard).
pub fn evaluate(
    setup: &Setup,
    examples: &[Example],
    args: &TrainArgs,
    world: &World,
) -> Result<EvalResult> {
    let t0 = Instant::now();
    let gpu = setup.model.params.params[0].tensor.gpu().clone();
    let mine = dist::shard(examples.len(), world.size(), world.rank());
    let ex = Arc::new(examples[mine].to_vec());
    let mut ld = loader(
        setup,
        &ex,
        (0..ex.len()).collect(),
        0,
        args,
        Batching {
            size: args.per_device_eval_batch_size,
            drop_last: false,
            refill: true,
        },
    )?;
    let s = setup.model.config.vision.image_size;
    let (mut loss_sum, mut n) = (0.0f64, 0usize);
    let mut images: Vec<Vec<f32>> = Vec::new();
    let mut image_ids: Vec<u64> = Vec::new();
    let mut seen: HashMap<u64, ()> = HashMap::new();
    let mut texts: Vec<Vec<f32>> = Vec::new();
    let mut text_ids: Vec<u64> = Vec::new();
    while let Some(b) = ld.next_batch()? {
        // Across ranks a stop is agreed at a step boundary instead: one
        // rank leaving the evaluation early would leave the others waiting.
        if let Some(signal) = interrupted().filter(|_| !world.is_distributed()) {
            return Err(Interrupted {
                signal,
                message: "the evaluation was cut short".into(),
            }
            .into());
        }
        for (p, why) in &b.skipped {
            log(&format!("skipped {}: {why}", p.display()));
        }
        let mut tape = Tape::no_grad();
        let vars = setup.model.params.vars(&mut tape);
        let out = setup
            .model
            .forward(&mut tape, &vars, &to_batch(&gpu, &b, s)?)?;
        loss_sum += out.loss.tensor().to_vec()?[0] as f64 * b.batch as f64;
        n += b.batch;
        let e = out.image_embeds.tensor().cols();
        let img = out.image_embeds.tensor().to_vec()?;
        let txt = out.text_embeds.tensor().to_vec()?;
        for i in 0..b.batch {
            texts.push(txt[i * e..(i + 1) * e].to_vec());
            text_ids.push(b.image_ids[i]);
            if seen.insert(b.image_ids[i], ()).is_none() {
                images.push(img[i * e..(i + 1) * e].to_vec());
                image_ids.push(b.image_ids[i]);
            }
        }
    }
    let (images, image_ids, texts, text_ids, loss_sum, n) = if world.is_distributed() {
        gather_eval(world, images, image_ids, texts, text_ids, loss_sum, n)?
    } else {
        (images, image_ids, texts, text_ids, loss_sum, n)
    };
    ensure!(n > 0, "the evaluation set has no usable examples");
    let r = recall_at_k(&images, &texts, &text_ids, &image_ids, &[1, 5, 10])?;
    let mut recall = Vec::new();
    for (k, v) in &r.i2t {
        recall.push((format!("i2t_recall@{k}"), *v));
    }
    for (k, v) in &r.t2i {
        recall.push((format!("t2i_recall@{k}"), *v));
    }
    Ok(EvalResult {
        loss: loss_sum / n as f64,
        recall,
        samples: n,
        runtime_s: t0.elapsed().as_secs_f64(),
    })
}

type EvalParts = (Vec<Vec<f32>>, Vec<u64>, Vec<Vec<f32>>, Vec<u64>, f64, usize);

/// Every rank's evaluation embeddings and ids, in rank order (the order of
/// the examples), an image counted once over all shards; the loss sums and
/// example counts added up.
fn gather_eval(
    world: &World,
    images: Vec<Vec<f32>>,
    image_ids: Vec<u64>,
    texts: Vec<Vec<f32>>,
    text_ids: Vec<u64>,
    loss_sum: f64,
    n: usize,
) -> Result<EvalParts> {
    let flat = |v: &[Vec<f32>]| v.concat();
    let e = texts.first().or(images.first()).map_or(0, Vec::len);
    let dims = world.all_gather_bytes(&(e as u64).to_le_bytes());
    let e = dims
        .iter()
        .map(|b| u64::from_le_bytes(b[..8].try_into().unwrap()) as usize)
        .max()
        .unwrap_or(0);
    let img = world.all_gather_f32(&flat(&images));
    let txt = world.all_gather_f32(&flat(&texts));
    let iid = world.all_gather_bytes(bytemuck::cast_slice(&image_ids));
    let tid = world.all_gather_bytes(bytemuck::cast_slice(&text_ids));
    let sums = world.all_gather_bytes(bytemuck::cast_slice(&[loss_sum, n as f64]));
    let rows = |v: &[f32]| -> Vec<Vec<f32>> { v.chunks(e.max(1)).map(<[f32]>::to_vec).collect() };
    let (mut images, mut image_ids, mut texts, mut text_ids) = (vec![], vec![], vec![], vec![]);
    let mut seen = std::collections::HashSet::new();
    for r in 0..world.size() {
        let ids: Vec<u64> = bytemuck::pod_collect_to_vec(&iid[r]);
        for (row, id) in rows(&img[r]).into_iter().zip(ids) {
            if seen.insert(id) {
                images.push(row);
                image_ids.push(id);
            }
        }
        texts.extend(rows(&txt[r]));
        text_ids.extend(bytemuck::pod_collect_to_vec::<u8, u64>(&tid[r]));
    }
    let (mut loss, mut count) = (0.0, 0usize);
    for b in &sums {
        let v: Vec<f64> = bytemuck::pod_collect_to_vec(b);
        loss += v[0];
        count += v[1] as usize;
    }
    Ok((images, image_ids, texts, text_ids, loss, count))
}

fn eval_json(r: &EvalResult, epoch: f64, prefix: &str) -> Value {
    let mut m = serde_json::Map::new();
    m.insert(format!("{prefix}loss"), json!(r.loss));
    for (k, v) in &r.recall {
        m.insert(format!("{prefix}{k}"), json!(v));
    }
    m.insert(format!("{prefix}runtime"), json!(r.runtime_s));
    m.insert(
        format!("{prefix}samples_per_second"),
        json!(r.samples as f64 / r.runtime_s.max(1e-9)),
    );
    m.insert("epoch".into(), json!(epoch));
    Value::Object(m)
}

fn print_eval(label: &str, r: &EvalResult) {
    let rec: Vec<String> = r
        .recall
        .iter()
        .map(|(k, v)| format!("{k} {:.3}", v))
        .collect();
    log(&format!(
        "{label}: eval_loss {:.4}, {} ({} examples)",
        r.loss,
        rec.join(", "),
        r.samples
    ));
}

/// run_clip.py's output_dir rule: refuse a non-empty folder without a
/// checkpoint unless --overwrite_output_dir; resume from the latest
/// checkpoint when there is one.
fn resolve_resume(args: &TrainArgs, main: bool) -> Result<Option<PathBuf>> {
    let out = &args.output_dir;
    let explicit = match args.resume() {
        None => None,
        Some(Resume::Latest) => Some(checkpoint::latest_checkpoint(out).with_context(|| {
            format!(
                "--resume_from_checkpoint: no checkpoint found in {}",
                out.display()
            )
        })?),
        Some(Resume::Path(p)) => {
            ensure!(
                p.is_dir(),
                "--resume_from_checkpoint {}: no such checkpoint folder",
                p.display()
            );
            Some(p)
        }
    };
    if explicit.is_some() {
        return Ok(explicit);
    }
    if out.is_dir() && args.do_train && !args.overwrite_output_dir {
        let last = checkpoint::latest_checkpoint(out);
        let names: Vec<String> = std::fs::read_dir(out)
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().to_string())
                    .collect()
            })
            .unwrap_or_default();
        // What a run of ours leaves before its first checkpoint: the metrics
        // log and a save cut short. Such a run starts over.
        let ours = |n: &String| n == "metrics.jsonl" || n.starts_with(".checkpoint-");
        if last.is_none() && !names.is_empty() && names.iter().all(ours) {
            log(&format!(
                "{} holds only what an earlier run left before its first checkpoint: starting over",
                out.display()
            ));
            if main {
                let _ = std::fs::remove_file(out.join("metrics.jsonl"));
            }
            return Ok(None);
        }
        let nonempty = !names.is_empty();
        if last.is_none() && nonempty {
            bail!(
                "Output directory ({}) already exists and is not empty. Use --overwrite_output_dir to overcome.",
                out.display()
            );
        }
        if let Some(l) = &last {
            log(&format!(
                "Checkpoint detected, resuming training at {}",
                l.display()
            ));
        }
        return Ok(last);
    }
    Ok(None)
}

/// Train (and/or evaluate) as the arguments say. Returns all_results.
pub fn run(args: &TrainArgs, gpu: &Arc<Gpu>) -> Result<Value> {
    run_on(args, gpu, &World::single())
}

/// [`run`] as one rank of `world`: the global batch is `world` times the
/// per-device one, each rank reading its slice; rank 0 alone writes the
/// checkpoints, logs, metrics and results (see [`crate::dist`]).
pub fn run_on(args: &TrainArgs, gpu: &Arc<Gpu>, world: &World) -> Result<Value> {
    QUIET.store(!world.is_main(), Ordering::Relaxed);
    world.set_local_loss(args.local_loss);
    let out = run_ranked(args, gpu, world)?;
    // No rank leaves before rank 0 has written everything: mpirun ends the
    // job when any process exits.
    world.barrier();
    Ok(out)
}

fn run_ranked(args: &TrainArgs, gpu: &Arc<Gpu>, world: &World) -> Result<Value> {
    let main = world.is_main();
    let mut args = args.clone();
    let mut setup = setup(&args, gpu)?;
    if setup.demo && !args.do_train && !args.do_eval {
        args.do_train = true;
        args.do_eval = true;
    }
    ensure!(
        args.do_train || args.do_eval,
        "nothing to do: pass --do_train and/or --do_eval"
    );
    // What a killed run left (a save cut short, a checkpoint renamed aside)
    // is tidied before the latest checkpoint is looked for.
    if args.do_train && main {
        for what in checkpoint::remove_stale_temp(&args.output_dir) {
            log(&what);
        }
    }
    world.barrier();
    let resume = if args.do_train {
        resolve_resume(&args, main)?
    } else {
        None
    };
    if world.is_distributed() {
        world.check_same(
            "the run",
            &format!(
                "{} training and {} evaluation examples, batch {} x {} accumulation, {} parameters, resuming from {:?}",
                setup.train.len(),
                setup.eval.len(),
                args.per_device_train_batch_size,
                args.gradient_accumulation_steps,
                setup.model.params.params.len(),
                resume
            ),
        )?;
    }
    // Every rank has read the output folder before rank 0 changes it.
    world.barrier();
    if main {
        if args.overwrite_output_dir
            && resume.is_none()
            && args.do_train
            && args.output_dir.is_dir()
        {
            std::fs::remove_dir_all(&args.output_dir)
                .with_context(|| format!("clearing {}", args.output_dir.display()))?;
        }
        std::fs::create_dir_all(&args.output_dir)
            .with_context(|| format!("creating {}", args.output_dir.display()))?;
    }
    world.barrier();
    if args.freeze_vision_model || args.freeze_text_model {
        setup
            .model
            .freeze(args.freeze_vision_model, args.freeze_text_model);
    }
    setup
        .model
        .set_gradient_checkpointing(args.gradient_checkpointing);
    let mut results = serde_json::Map::new();
    let mut before = None;
    let max_len = setup.max_len;
    let eval_oom = |e: anyhow::Error| {
        if is_oom(&e) {
            let advice = oom_advice(
                "per_device_eval_batch_size",
                args.per_device_eval_batch_size,
                1,
                max_len,
                &args,
            );
            e.context(format!("evaluation: {advice}"))
        } else {
            e
        }
    };
    if setup.demo && args.do_eval && !setup.eval.is_empty() {
        let r = evaluate(&setup, &setup.eval, &args, world).map_err(eval_oom)?;
        print_eval("before training", &r);
        before = Some(r);
    }
    let mut state = RunState::default();
    if args.do_train {
        ensure!(!setup.train.is_empty(), "the training set has no examples");
        let mut at = Whereabouts::default();
        state = train_loop(
            &args,
            &mut setup,
            resume.as_deref(),
            &mut results,
            &mut at,
            world,
        )
        .map_err(|e| explain_stop(e, &args, gpu, &at, max_len))?;
        check_finite_weights(&setup.model.params)?;
        if main {
            checkpoint::save_model(&args.output_dir, &setup.model, &setup.processing)?;
            log(&format!("saved the model to {}", args.output_dir.display()));
        }
    }
    if args.do_eval && !setup.eval.is_empty() {
        let r = match evaluate(&setup, &setup.eval, &args, world) {
            Ok(r) => r,
            Err(e) => match e.downcast::<Interrupted>() {
                Ok(i) => {
                    return Err(Interrupted {
                        message: if args.do_train {
                            format!(
                                "during the final evaluation; training had finished and the model is saved in {}",
                                args.output_dir.display()
                            )
                        } else {
                            "during the evaluation".into()
                        },
                        ..i
                    }
                    .into())
                }
                Err(e) => return Err(eval_oom(e)),
            },
        };
        print_eval(
            if setup.demo {
                "after training"
            } else {
                "evaluation"
            },
            &r,
        );
        let ej = eval_json(&r, state.epoch, "eval_");
        if main {
            write_json(&args.output_dir.join("eval_results.json"), &ej)?;
        }
        if let Value::Object(m) = ej {
            results.extend(m);
        }
        if let Some(b) = before {
            let r1 = |r: &EvalResult| {
                r.recall
                    .iter()
                    .find(|(k, _)| k == "i2t_recall@1")
                    .map(|x| x.1)
                    .unwrap_or(0.0)
            };
            log(&format!(
                "demo: image-to-text recall@1 {:.3} before, {:.3} after training (chance {:.3})",
                r1(&b),
                r1(&r),
                1.0 / setup.eval.len() as f64
            ));
        }
    }
    let all = Value::Object(results);
    if main {
        write_json(&args.output_dir.join("all_results.json"), &all)?;
    }
    Ok(all)
}

fn write_json(p: &Path, v: &Value) -> Result<()> {
    write_atomic(p, serde_json::to_string_pretty(v)?.as_bytes())
}

/// Write a checkpoint of the current state (never from non-finite weights).
#[allow(clippy::too_many_arguments)]
fn save(
    args: &TrainArgs,
    setup: &Setup,
    opt: &Optimizer,
    state: &RunState,
    schedule: &Schedule,
    run_info: &Value,
    faults: &Faults,
) -> Result<PathBuf> {
    check_finite_weights(&setup.model.params)?;
    if faults
        .at("device_lost_at_save", state.global_step)
        .is_some()
    {
        setup.model.params.params[0].tensor.gpu().device.destroy();
    }
    let p = checkpoint::save_checkpoint(
        &args.output_dir,
        &setup.model,
        opt,
        state,
        &schedule.to_json(state.global_step),
        run_info,
        &setup.processing,
    )?;
    if let Some(limit) = args.save_total_limit {
        checkpoint::rotate(&args.output_dir, limit)?;
    }
    Ok(p)
}

fn train_loop(
    args: &TrainArgs,
    setup: &mut Setup,
    resume: Option<&Path>,
    results: &mut serde_json::Map<String, Value>,
    at: &mut Whereabouts,
    world: &World,
) -> Result<RunState> {
    let gpu = setup.model.params.params[0].tensor.gpu().clone();
    let t0 = Instant::now();
    let examples = Arc::new(setup.train.clone());
    let bs = args.per_device_train_batch_size;
    let main = world.is_main();
    let dist = world.is_distributed();
    // Across ranks: global batches of world x bs, each rank reading its
    // slice of each (one process: the loader's own batches).
    let shards = EpochShards::new(examples.len(), world.size(), bs, args.dataloader_drop_last);
    let batches_per_epoch = if dist {
        shards.batches
    } else {
        args.batches_per_epoch(examples.len())
    };
    let total = args.total_steps(batches_per_epoch);
    ensure!(
        total > 0,
        "no training steps: check --max_steps / --num_train_epochs and the data size"
    );
    let log_every = args.logging_steps_for(total);
    let eval_every = args.eval_steps_for(total);
    let save_every = args.save_steps_for(total);
    let accum = args.gradient_accumulation_steps.max(1);
    let warmup = args.warmup_steps_for(total);
    let faults = Faults::from_env()?;
    let group_host = group_host_bytes()?;
    let schedule = Schedule::new(
        &args.lr_scheduler_type,
        args.learning_rate,
        warmup as u64,
        total as u64,
    )?;
    let hp = AdamW {
        lr: args.learning_rate as f32,
        beta1: args.adam_beta1 as f32,
        beta2: args.adam_beta2 as f32,
        eps: args.adam_epsilon as f32,
        weight_decay: args.weight_decay as f32,
    };
    let mut opt = Optimizer::new(&setup.model.params, hp, args.max_grad_norm as f32)?;
    let mut state = RunState::default();
    if let Some(dir) = resume {
        let loaded = checkpoint::load_checkpoint(dir)?;
        let m = ClipModel::load(&gpu, dir)?;
        for (dst, src) in setup.model.params.params.iter().zip(&m.params.params) {
            ensure!(
                dst.name == src.name,
                "checkpoint {} holds a different model",
                dir.display()
            );
            dst.tensor.write(&src.tensor.to_vec()?)?;
        }
        opt.load_state(
            &setup.model.params,
            &loaded.optimizer,
            &dir.display().to_string(),
        )?;
        state = loaded.state;
        if let Some((choices, adapter)) = &loaded.kernel_choices {
            gpu.pin_kernel_choices(choices);
            if adapter != &gpu.info.name {
                log(&format!(
                    "taking the {} kernel choices {} recorded (measured on {adapter}), so the \
                     resumed steps compute as the first ones did",
                    choices.len(),
                    dir.display()
                ));
            }
        }
        let now = [
            ("training examples", examples.len()),
            ("examples per global batch", world.size() * bs),
            ("gradient accumulation steps", accum),
        ];
        let differs = resume_differences(&loaded.run, &now);
        if !differs.is_empty() {
            ensure!(
                args.ignore_data_skip,
                "cannot resume from {}: {}, so the data would not go on where it stopped. Pass \
                 --ignore_data_skip to take its weights, optimizer and schedule anyway and read the \
                 current epoch from its beginning",
                dir.display(),
                differs.join("; ")
            );
            log(&format!(
                "resuming from {} although {} (--ignore_data_skip)",
                dir.display(),
                differs.join("; ")
            ));
        }
        if args.ignore_data_skip {
            // The Trainer's meaning: the epoch in progress is read again
            // from its start instead of skipping what was seen.
            state.data_position = 0;
        }
        log(&format!(
            "resumed from {} at step {}",
            dir.display(),
            state.global_step
        ));
    }
    let metrics_path = args.output_dir.join("metrics.jsonl");
    if resume.is_some() {
        // The steps after the checkpoint are trained and logged again: drop
        // what the interrupted run logged for them, so no step appears twice.
        let dropped = MetricsLog::truncate_after(&metrics_path, state.global_step)?;
        if dropped > 0 {
            log(&format!(
                "dropped {dropped} record(s) after step {} from {}: those steps run again",
                state.global_step,
                metrics_path.display()
            ));
        }
    }
    at.step = state.global_step;
    let mut run_info = json!({
        "seed": args.seed,
        "train_examples": examples.len(),
        "batch_size": bs,
        "gradient_accumulation_steps": accum,
        "max_steps": total,
    });
    if dist {
        run_info["world_size"] = json!(world.size());
    }
    let contrastive = match (accum, args.accumulation_loss) {
        (1, _) => String::new(),
        (_, AccumulationLoss::Full) => format!(
            " (one contrastive loss over all {} pairs of a step: --accumulation_loss full)",
            bs * accum
        ),
        (_, AccumulationLoss::Micro) => {
            format!(" (a contrastive loss per batch of {bs}, averaged: --accumulation_loss micro)")
        }
    };
    let ranks = if dist {
        format!(
            " on each of {} ranks (global batch {} per step{})",
            world.size(),
            world.size() * bs * accum,
            if world.local_loss() {
                ", local loss"
            } else {
                ""
            }
        )
    } else {
        String::new()
    };
    log(&format!(
        "training: {} examples, batch {bs}{ranks}, {accum} accumulation step(s){contrastive}, {total} optimizer steps, \
         warmup {warmup}, {} schedule, lr {}{}",
        examples.len(),
        args.lr_scheduler_type,
        args.learning_rate,
        if setup.model.gradient_checkpointing() {
            ", gradient checkpointing"
        } else {
            ""
        }
    ));
    let mut metrics = if main {
        Some(MetricsLog::open(&metrics_path)?)
    } else {
        None
    };
    let s = setup.model.config.vision.image_size;
    let ls_index = setup.model.logit_scale;
    // Finite losses summed and counted since the last log line.
    let mut window = (0.0f64, 0usize);
    let mut last_log = Instant::now();
    let mut images_since = 0usize;
    // The chart's series: the resumed history's, then each new log entry's.
    let mut chart = ChartData::from_records(state.log_history.iter().filter_map(Value::as_object));
    let mut skipped_total = 0usize;
    // Non-finite steps skipped in a row (--max_consecutive_nonfinite_steps).
    let mut skipped_in_a_row = 0usize;
    let progress = if main {
        crate::train::progress::Progress::new(total as u64, state.global_step, !args.no_progress)
    } else {
        crate::train::progress::Progress::silent(total as u64, state.global_step)
    };
    let trainable: Vec<bool> = setup
        .model
        .params
        .params
        .iter()
        .map(|p| p.trainable)
        .collect();
    let shapes: Vec<Vec<usize>> = setup
        .model
        .params
        .params
        .iter()
        .map(|p| p.tensor.shape().to_vec())
        .collect();
    if dist {
        check_replicas(world, &setup.model.params, state.global_step)?;
    }
    world.take_stats();
    let mut comm_total = dist::CommStats::default();
    let mut steps_since = 0usize;
    let mut total_loss = 0.0f64;
    let mut loss_steps = 0usize;
    let mut steps_run = 0usize;
    let mut examples_run = 0usize;
    // From here on SIGINT / SIGTERM mean: checkpoint at the step's end, stop.
    arm_interrupts();
    at.started = true;
    'epochs: while (state.global_step as usize) < total {
        let epoch = state.data_epoch;
        let mut order = epoch_order(examples.len(), args.data_seed(), epoch);
        let mut start = state.data_position;
        // Global batches of this epoch done (across ranks).
        let mut global_done = shards.batches_done(state.data_position);
        if dist {
            order = shards.rank_order(&order, world.size(), world.rank());
            start = shards.rank_start(state.data_position, world.size(), world.rank());
        }
        // Ranks read fixed slices (no refill past a bad picture, no
        // drop_last: their orders hold whole global batches only).
        let how = Batching {
            size: bs,
            drop_last: args.dataloader_drop_last && !dist,
            refill: !dist,
        };
        let mut ld = loader(setup, &examples, order.clone(), start, args, how)?;
        loop {
            // The next accumulation group: `accum` batches, fewer at the end
            // of the epoch.
            let step_no = state.global_step + 1;
            let group_start = ld.position();
            let Some(first) = ld.next_batch()? else {
                break;
            };
            if faults.at("device_lost", step_no).is_some() {
                gpu.device.destroy();
            }
            if faults.at("oom", step_no).is_some() {
                // A real allocation failure: past the adapter's limit.
                let n = (gpu.limits.max_buffer_size / 4 + 1) as usize;
                Tensor::empty(&gpu, &[n])?;
            }
            let (out, group) = if accum > 1 && args.accumulation_loss == AccumulationLoss::Full {
                // Streamed: pass 1 pulls the batches; pass 2 has them again.
                let reopen =
                    |start: usize| loader(setup, &examples, order.clone(), start, args, how);
                let mut src = GroupStream::new(
                    &mut ld,
                    first,
                    group_start,
                    accum,
                    &gpu,
                    s,
                    &reopen,
                    group_host,
                );
                let out = full_batch_grads(&setup.model, &mut src, world)?;
                (out, src.taken)
            } else {
                let mut group = vec![first];
                while group.len() < accum {
                    match ld.next_batch()? {
                        Some(b) => group.push(b),
                        None => break,
                    }
                }
                let out = group_grads(
                    &setup.model,
                    args.accumulation_loss,
                    group.len(),
                    |i| to_batch(&gpu, &group[i], s),
                    world,
                )?;
                (out, group)
            };
            let end_of_epoch = group.len() < accum;
            for b in &group {
                for (p, why) in &b.skipped {
                    skipped_total += 1;
                    if skipped_total <= 5 {
                        log(&format!("skipped {}: {why}", p.display()));
                    }
                }
            }
            let mut step_examples: usize = group.iter().map(|b| b.batch).sum();
            let group_len = group.len();
            drop(group);
            {
                let lr = schedule.lr_at(state.global_step) as f32;
                let mut grads = out.grads;
                if let Some(name) = faults.at("nan_grad", step_no) {
                    let (p, g) = setup
                        .model
                        .params
                        .params
                        .iter()
                        .zip(&grads)
                        .find(|(p, g)| g.is_some() && p.name.contains(name))
                        .with_context(|| {
                            format!("CLIP_WGPU_FAULTS: no gradient named like {name:?}")
                        })?;
                    let g = g.as_ref().unwrap();
                    log(&format!("injecting NaN into the gradient of {}", p.name));
                    g.write(&vec![f32::NAN; g.numel()])?;
                }
                // Across ranks: sum the gradients (logit_scale's is whole on
                // every rank: counted once), and agree on a stop request.
                let mut stop = interrupted();
                if dist {
                    let asked = f32::from(u8::from(stop.is_some()));
                    let flags = dist::all_reduce_grads(
                        world,
                        &trainable,
                        &mut grads,
                        &shapes,
                        &[ls_index],
                        &[asked, step_examples as f32],
                    )?;
                    stop = (flags[0] > 0.0).then(|| interrupted().unwrap_or(SIGTERM));
                    step_examples = flags[1] as usize;
                }
                images_since += step_examples;
                steps_since += 1;
                // The step's readback: [norm, coef] (then the losses, read
                // after the norm so that a step waits for the GPU once).
                let norm = opt.grad_norm(&setup.model.params, &grads)?;
                let nv = norm.to_vec()?;
                let mut step_loss = 0.0f64;
                for l in &out.losses {
                    step_loss += l.to_vec()?[0] as f64 * out.loss_weight;
                }
                let finite = step_loss.is_finite() && nv[0].is_finite();
                if finite {
                    skipped_in_a_row = 0;
                    opt.apply(&setup.model.params, &grads, &norm, lr)?;
                    clamp_inplace(
                        &setup.model.params.params[ls_index].tensor,
                        f32::MIN,
                        MAX_LOGIT_SCALE,
                    )?;
                } else {
                    let what = nonfinite_report(&setup.model.params, &grads, step_loss, nv[0])?;
                    if !args.skip_nonfinite_steps {
                        progress.finish();
                        return Err(NonFinite(format!(
                            "training step {step_no}: {what}. The weights were not updated and nothing was saved \
                             from this step; {}. Lower --learning_rate or --max_grad_norm, check the data, \
                             or pass --skip_nonfinite_steps to skip such steps",
                            resume_note(args)
                        ))
                        .into());
                    }
                    state.skipped_nonfinite_steps += 1;
                    progress.log(&format!(
                        "step {step_no}: {what}: skipped, the weights were not updated \
                         ({} step(s) skipped so far)",
                        state.skipped_nonfinite_steps
                    ));
                    skipped_in_a_row += 1;
                    let limit = args.max_consecutive_nonfinite_steps;
                    if limit > 0 && skipped_in_a_row >= limit {
                        progress.finish();
                        return Err(NonFinite(format!(
                            "training step {step_no}: {what}. That makes {skipped_in_a_row} non-finite steps in a row \
                             (steps {}-{step_no}, all skipped; --max_consecutive_nonfinite_steps {limit}): stopping, \
                             as training no longer progresses. The weights were not updated by these steps and \
                             stay finite; {}. Lower --learning_rate or --max_grad_norm, or check the data",
                            step_no + 1 - skipped_in_a_row as u64,
                            resume_note(args)
                        ))
                        .into());
                    }
                }
                drop(grads);
                steps_run += 1;
                examples_run += step_examples;
                state.global_step += 1;
                at.step = state.global_step;
                state.data_position = if dist {
                    global_done += group_len;
                    shards.global_position(global_done)
                } else {
                    ld.position()
                };
                state.epoch = epoch as f64 + state.data_position as f64 / examples.len() as f64;
                if finite {
                    total_loss += step_loss;
                    loss_steps += 1;
                    window.0 += step_loss;
                    window.1 += 1;
                }
                progress.step(state.global_step, step_loss, lr as f64, step_examples);
                let step = state.global_step as usize;
                if log_every > 0 && (step.is_multiple_of(log_every) || step == total) {
                    let dt = last_log.elapsed().as_secs_f64();
                    let pool = gpu.pool_stats();
                    let mib = |b: u64| b as f64 / 1048576.0;
                    let mut entry = json!({
                        "grad_norm": nv[0],
                        "learning_rate": lr,
                        "epoch": state.epoch,
                        "step": step,
                        "images_per_second": images_since as f64 / dt.max(1e-9),
                        "pool_mib": mib(pool.held_bytes),
                        "pool_peak_mib": mib(pool.peak_bytes),
                    });
                    let loss = (window.1 > 0).then(|| window.0 / window.1 as f64);
                    if let Some(l) = loss {
                        entry["loss"] = json!(l);
                    }
                    if state.skipped_nonfinite_steps > 0 {
                        entry["skipped_nonfinite_steps"] = json!(state.skipped_nonfinite_steps);
                    }
                    let mut comm = String::new();
                    if dist {
                        // Collectives of this rank (rank 0's, as it logs).
                        let c = world.take_stats();
                        let per = steps_since.max(1) as f64;
                        entry["mpi_seconds_per_step"] = json!(c.seconds / per);
                        entry["mpi_mib_sent_per_step"] = json!(mib(c.bytes_sent) / per);
                        comm = format!(
                            ", MPI {:.1} ms and {:.2} MiB sent per step",
                            c.seconds * 1e3 / per,
                            mib(c.bytes_sent) / per
                        );
                        comm_total.calls += c.calls;
                        comm_total.seconds += c.seconds;
                        comm_total.bytes_sent += c.bytes_sent;
                    }
                    steps_since = 0;
                    progress.log(&format!(
                        "step {step}/{total}: loss {}, lr {:.3e}, grad_norm {:.3}, {:.1} images/s, \
                         GPU pool peak {:.0} MiB{comm}",
                        loss.map_or("- (skipped)".into(), |l| format!("{l:.4}")),
                        lr,
                        nv[0],
                        images_since as f64 / dt.max(1e-9),
                        mib(pool.peak_bytes)
                    ));
                    if let Some(m) = metrics.as_mut() {
                        m.write(&entry)?;
                    }
                    if let Some(m) = entry.as_object() {
                        chart.push_record(m);
                    }
                    state.log_history.push(entry);
                    window = (0.0, 0);
                    images_since = 0;
                    last_log = Instant::now();
                }
                if args.do_eval
                    && args.evaluates_during_training()
                    && eval_every > 0
                    && step.is_multiple_of(eval_every)
                    && !setup.eval.is_empty()
                {
                    at.evaluating = true;
                    let r = evaluate(setup, &setup.eval, args, world);
                    at.evaluating = false;
                    match r {
                        Ok(r) => {
                            let mut entry = eval_json(&r, state.epoch, "eval_");
                            entry["step"] = json!(step);
                            if let Some(m) = metrics.as_mut() {
                                m.write(&entry)?;
                            }
                            progress.log(&format!("step {step}: eval_loss {:.4}", r.loss));
                            if let Some(m) = entry.as_object() {
                                chart.push_record(m);
                            }
                            state.log_history.push(entry);
                        }
                        // Saved below; the evaluation is not in the log.
                        Err(e) if e.is::<Interrupted>() => {
                            progress.log(&format!("step {step}: evaluation cut short"))
                        }
                        Err(e) => return Err(e),
                    }
                }
                let mut saved = None;
                if save_every > 0 && step.is_multiple_of(save_every) && step < total && main {
                    at.saving = true;
                    let p = save(args, setup, &opt, &state, &schedule, &run_info, &faults)?;
                    at.saving = false;
                    progress.log(&format!("saved {}", p.display()));
                    saved = Some(p);
                }
                if dist && args.sync_check_steps > 0 && step.is_multiple_of(args.sync_check_steps) {
                    check_replicas(world, &setup.model.params, state.global_step)?;
                }
                if step >= total {
                    break 'epochs;
                }
                if faults.at("wait_for_signal", step as u64).is_some() && interrupted().is_none() {
                    log(&format!(
                        "waiting for a signal after step {step} (test fault)"
                    ));
                    while interrupted().is_none() {
                        std::thread::sleep(std::time::Duration::from_millis(5));
                    }
                    if !dist {
                        stop = interrupted();
                    }
                }
                if let Some(signal) = stop {
                    if faults.has("hold_at_interrupt") {
                        // For a test of the second signal: stay at this step
                        // boundary (say so first) until it arrives.
                        log("holding at the step boundary of an interrupt (test fault)");
                        let t0 = Instant::now();
                        while t0.elapsed().as_secs() < 600 {
                            std::thread::sleep(std::time::Duration::from_millis(10));
                        }
                    }
                    let p = match saved {
                        Some(p) => p,
                        None if main => {
                            at.saving = true;
                            save(args, setup, &opt, &state, &schedule, &run_info, &faults)?
                        }
                        None => checkpoint::checkpoint_dir(&args.output_dir, state.global_step),
                    };
                    progress.finish();
                    // The other ranks wait for rank 0's save: mpirun ends the
                    // job when the first process exits.
                    world.barrier();
                    return Err(Interrupted {
                        signal,
                        message: format!(
                            "stopped after step {step} of {total} and saved {}. Run the same command again to \
                             resume from it (or pass --resume_from_checkpoint {})",
                            p.display(),
                            p.display()
                        ),
                    }
                    .into());
                }
            }
            if end_of_epoch {
                break;
            }
        }
        state.data_epoch += 1;
        state.data_position = 0;
    }
    progress.finish();
    gpu.sync()?;
    // The final state as a checkpoint too, so a finished run can be extended.
    if main {
        at.saving = true;
        save(args, setup, &opt, &state, &schedule, &run_info, &faults)?;
        at.saving = false;
    }
    let runtime = t0.elapsed().as_secs_f64();
    let mut train = json!({
        "epoch": state.epoch,
        "train_loss": total_loss / loss_steps.max(1) as f64,
        "train_runtime": runtime,
        "train_samples_per_second": examples_run as f64 / runtime.max(1e-9),
        "train_steps_per_second": steps_run as f64 / runtime.max(1e-9),
        "train_skipped_images": skipped_total,
        "train_skipped_nonfinite_steps": state.skipped_nonfinite_steps,
    });
    if dist {
        let c = world.take_stats();
        comm_total.seconds += c.seconds;
        comm_total.bytes_sent += c.bytes_sent;
        train["world_size"] = json!(world.size());
        train["mpi_seconds"] = json!(comm_total.seconds);
        train["mpi_mib_sent"] = json!(comm_total.bytes_sent as f64 / 1048576.0);
    }
    if main {
        write_json(&args.output_dir.join("train_results.json"), &train)?;
        write_json(
            &args.output_dir.join("trainer_state.json"),
            &state.to_json(&run_info),
        )?;
        loss_curve_png(&args.output_dir.join("loss_curve.png"), &chart)?;
    }
    if let Value::Object(m) = train {
        results.extend(m);
    }
    if skipped_total > 0 {
        log(&format!(
            "skipped {skipped_total} unreadable image(s) in total"
        ));
    }
    if state.skipped_nonfinite_steps > 0 {
        log(&format!(
            "skipped {} optimizer step(s) with a non-finite loss or gradient (--skip_nonfinite_steps)",
            state.skipped_nonfinite_steps
        ));
    }
    Ok(state)
}

//! `clip-wgpu train`: run_clip.py's workflow. Load (or randomly initialise)
//! a model, read the data, train with AdamW and the chosen schedule, evaluate
//! (loss and retrieval recall@K), checkpoint, resume, and save a model that
//! transformers loads.
//!
//! This file holds the run ([`run`]: set up, train, evaluate, write the
//! results) and the training loop's outline (`train_loop`). Its parts:
//! - `setup`: the model, tokenizer, processor and examples ([`setup()`]).
//! - `batches`: loaders over the examples, this rank's batches of an epoch
//!   and an accumulation group's gradients.
//! - `step`: one optimizer step from a group's gradients (summed across
//!   ranks, checked for non-finite values, applied or skipped).
//! - `record`: the progress display, the log lines, metrics.jsonl and the
//!   totals of train_results.json.
//! - `evaluate`: eval_loss and retrieval recall@K ([`evaluate()`]).
//! - `save`: checkpoints, the final model and the result files.
//! - `faults`: signals, the faults tests inject (`CLIP_WGPU_FAULTS`), and
//!   errors that stop training explained (its docs list what a run does
//!   about each fault).

use super::accumulate::AccumulationLoss;
use super::args::{Resume, TrainArgs};
use super::batches::{group_host_bytes, EpochBatches};
use super::checkpoint::{self, RunState};
use super::evaluate::{eval_json, print_eval};
use super::faults::{arm_interrupts, explain_stop, is_oom, oom_advice, Faults, Whereabouts};
use super::metrics::MetricsLog;
use super::optimizer::Optimizer;
use super::progress::{log, QUIET};
use super::record::Record;
use super::save::{save_checkpoint, save_model, training_results, write_json};
use super::scaler::GradScaler;
use super::step::{check_replicas, Stepper};
use crate::data::sources::Example;
use crate::dist::{EpochShards, World};
use crate::model::clip::ClipModel;
use crate::precision::Precision;
use crate::Gpu;
use anyhow::{bail, ensure, Context, Result};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

pub use super::evaluate::{evaluate, EvalResult};
pub use super::faults::{catch_interrupts, interrupted, Interrupted, NonFinite};
pub use super::setup::{setup, Setup};

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
                "{} training examples ({} shards), {} evaluation examples, batch {} x {} accumulation, {} parameters, resuming from {:?}",
                setup.train.len(),
                setup.train_stream.as_ref().map_or(0, |s| s.shards.len()),
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
    // --fp16 / --bf16: 16-bit activations in training and evaluation (the
    // Trainer evaluates under autocast too).
    setup.model.precision = args.precision;
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
        ensure!(
            !setup.train.is_empty() || setup.train_stream.is_some(),
            "the training set has no examples"
        );
        let mut at = Whereabouts::default();
        state = train_loop(
            &args,
            &setup,
            resume.as_deref(),
            &mut results,
            &mut at,
            world,
        )
        .map_err(|e| explain_stop(e, &args, gpu, &at, max_len))?;
        save_model(&args, &setup, main)?;
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

/// What a training run will do, fixed before its first step.
struct Plan {
    examples: Arc<Vec<Example>>,
    /// Across ranks: global batches of world x batch, each rank reading its
    /// slice of each (one process: the loader's own batches).
    shards: EpochShards,
    /// Optimizer steps, and those of the warmup.
    total: usize,
    warmup: usize,
    /// A log line, an evaluation and a checkpoint every this many steps
    /// (0: never).
    log_every: usize,
    eval_every: usize,
    save_every: usize,
    accum: usize,
    faults: Faults,
    /// Host bytes a full-batch group's pictures may keep for pass 2.
    group_host: usize,
    /// What fixes the data order, kept with each checkpoint.
    run_info: Value,
    /// WebDataset training: this rank's samples per epoch when known
    /// (--max_train_samples, or counted), and whether that caps the epoch.
    stream_samples: Option<usize>,
    stream_cap: Option<usize>,
}

impl Plan {
    fn new(args: &TrainArgs, setup: &Setup, world: &World) -> Result<Plan> {
        let examples = Arc::new(setup.train.clone());
        let bs = args.per_device_train_batch_size;
        let dist = world.is_distributed();
        let shards = EpochShards::new(examples.len(), world.size(), bs, args.dataloader_drop_last);
        let (stream_samples, stream_cap) = match &setup.train_stream {
            None => (None, None),
            Some(set) => stream_epoch(args, set, world)?,
        };
        let batches_per_epoch = if let Some(n) = stream_samples {
            args.batches_per_epoch(n)
        } else if setup.train_stream.is_some() {
            // Unknown (not counted, as --max_steps fixes the run's length).
            1
        } else if dist {
            shards.batches
        } else {
            args.batches_per_epoch(examples.len())
        };
        let total = args.total_steps(batches_per_epoch);
        ensure!(
            total > 0,
            "no training steps: check --max_steps / --num_train_epochs and the data size"
        );
        let accum = args.gradient_accumulation_steps.max(1);
        let mut run_info = json!({
            "seed": args.seed,
            "train_examples": examples.len(),
            "batch_size": bs,
            "gradient_accumulation_steps": accum,
            "max_steps": total,
            "precision": args.precision.name(),
        });
        if dist {
            run_info["world_size"] = json!(world.size());
        }
        if let Some(set) = &setup.train_stream {
            let m = run_info.as_object_mut().expect("an object");
            m.remove("train_examples");
            m.insert("train_shards".into(), json!(set.shards.len()));
            m.insert("shuffle_buffer".into(), json!(args.shuffle_buffer.max(1)));
            if let Some(c) = stream_cap {
                m.insert("stream_samples_per_epoch".into(), json!(c));
            }
        }
        Ok(Plan {
            stream_samples,
            stream_cap,
            log_every: args.logging_steps_for(total),
            eval_every: args.eval_steps_for(total),
            save_every: args.save_steps_for(total),
            accum,
            warmup: args.warmup_steps_for(total),
            faults: Faults::from_env()?,
            group_host: group_host_bytes()?,
            examples,
            shards,
            total,
            run_info,
        })
    }

    /// The line that says what the run will do.
    fn describe(&self, args: &TrainArgs, setup: &Setup, world: &World) -> String {
        let (bs, accum, total) = (args.per_device_train_batch_size, self.accum, self.total);
        let contrastive = match (accum, args.accumulation_loss) {
            (1, _) => String::new(),
            (_, AccumulationLoss::Full) => format!(
                " (one contrastive loss over all {} pairs of a step: --accumulation_loss full)",
                bs * accum
            ),
            (_, AccumulationLoss::Micro) => {
                format!(
                    " (a contrastive loss per batch of {bs}, averaged: --accumulation_loss micro)"
                )
            }
        };
        let ranks = if world.is_distributed() {
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
        let data = match (&setup.train_stream, self.stream_samples) {
            (Some(set), Some(n)) => format!(
                "{} WebDataset shard(s) (~{n} samples per epoch{}), shuffle buffer {}",
                set.shards.len(),
                if world.is_distributed() {
                    " per rank"
                } else {
                    ""
                },
                args.shuffle_buffer.max(1)
            ),
            (Some(set), None) => format!(
                "{} WebDataset shard(s), shuffle buffer {}",
                set.shards.len(),
                args.shuffle_buffer.max(1)
            ),
            _ => format!("{} examples", self.examples.len()),
        };
        format!(
            "training: {data}, batch {bs}{ranks}, {accum} accumulation step(s){contrastive}, {total} optimizer steps, \
             warmup {}, {} schedule, lr {}{}",
            self.warmup,
            args.lr_scheduler_type,
            args.learning_rate,
            if setup.model.gradient_checkpointing() {
                ", gradient checkpointing"
            } else {
                ""
            }
        )
    }

    /// Whether the run evaluates after `step` (--eval_strategy steps).
    fn evaluates_at(&self, step: usize, args: &TrainArgs, setup: &Setup) -> bool {
        args.do_eval
            && args.evaluates_during_training()
            && self.eval_every > 0
            && step.is_multiple_of(self.eval_every)
            && !setup.eval.is_empty()
    }

    /// Whether rank 0 saves a checkpoint after `step` (the last step's is
    /// saved at the end).
    fn saves_at(&self, step: usize, world: &World) -> bool {
        self.save_every > 0
            && step.is_multiple_of(self.save_every)
            && step < self.total
            && world.is_main()
    }
}

/// The weights, optimizer state and run state of checkpoint `dir`, checked
/// against this run (what fixes the data order must match unless
/// --ignore_data_skip); what the metrics log holds after its step is dropped,
/// as those steps run again.
fn resume_from(
    dir: &Path,
    args: &TrainArgs,
    plan: &Plan,
    setup: &Setup,
    opt: &mut Optimizer,
    world: &World,
) -> Result<RunState> {
    let gpu = setup.model.params.params[0].tensor.gpu().clone();
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
    let mut state = loaded.state;
    check_resume_precision(dir, &loaded.run, &state, args.precision)?;
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
        ("training examples", plan.examples.len()),
        (
            "examples per global batch",
            world.size() * args.per_device_train_batch_size,
        ),
        ("gradient accumulation steps", plan.accum),
    ];
    let mut differs = resume_differences(&loaded.run, &now);
    if setup.train_stream.is_some() {
        differs.extend(stream_differences(&loaded.run, setup, args, world));
    }
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
        state.data_stream = None;
    }
    log(&format!(
        "resumed from {} at step {}",
        dir.display(),
        state.global_step
    ));
    // The steps after the checkpoint are trained and logged again: drop
    // what the interrupted run logged for them, so no step appears twice.
    // Rank 0 alone writes the log (every rank rewriting it raced on the
    // temporary file's rename).
    let metrics_path = args.output_dir.join("metrics.jsonl");
    let dropped = if world.is_main() {
        MetricsLog::truncate_after(&metrics_path, state.global_step)?
    } else {
        0
    };
    if dropped > 0 {
        log(&format!(
            "dropped {dropped} record(s) after step {} from {}: those steps run again",
            state.global_step,
            metrics_path.display()
        ));
    }
    Ok(state)
}

/// Train from the start or from checkpoint `resume` until the plan's last
/// step, evaluating and checkpointing on the way; `at` follows where it
/// stands (for the error that stops it). Adds the training figures to
/// `results` and returns the final state.
fn train_loop(
    args: &TrainArgs,
    setup: &Setup,
    resume: Option<&Path>,
    results: &mut serde_json::Map<String, Value>,
    at: &mut Whereabouts,
    world: &World,
) -> Result<RunState> {
    let gpu = setup.model.params.params[0].tensor.gpu().clone();
    let t0 = Instant::now();
    let plan = Plan::new(args, setup, world)?;
    let mut stepper = Stepper::new(args, &setup.model, plan.total, plan.warmup, world)?;
    let mut state = match resume {
        Some(dir) => resume_from(dir, args, &plan, setup, &mut stepper.opt, world)?,
        None => RunState {
            grad_scaler: GradScaler::for_precision(args.precision),
            ..RunState::default()
        },
    };
    at.step = state.global_step;
    log(&plan.describe(args, setup, world));
    let mut record = Record::open(args, plan.total, plan.log_every, &state, world)?;
    if world.is_distributed() {
        check_replicas(world, &setup.model.params, state.global_step)?;
    }
    world.take_stats();
    // From here on SIGINT / SIGTERM mean: checkpoint at the step's end, stop.
    arm_interrupts();
    at.started = true;
    let save = |stepper: &Stepper, state: &RunState| {
        save_checkpoint(
            args,
            setup,
            &stepper.opt,
            state,
            &stepper.schedule,
            &plan.run_info,
            &plan.faults,
        )
    };
    'epochs: while (state.global_step as usize) < plan.total {
        let mut batches = EpochBatches::start(
            setup,
            args,
            &plan.examples,
            &plan.shards,
            &state,
            world,
            plan.group_host,
            plan.stream_cap,
        )?;
        // One accumulation group a step: `accum` batches, fewer at the end
        // of the epoch.
        while let Some(first) = batches.first()? {
            plan.faults.before_step(state.global_step + 1, &gpu)?;
            let loss_scale = state.grad_scaler.as_ref().map_or(1.0, |s| s.scale);
            let (grads, group) = batches.gradients(first, world, loss_scale)?;
            let end_of_epoch = group.len() < plan.accum;
            record.skipped_pictures(&group);
            let examples: usize = group.iter().map(|b| b.batch).sum();
            let group_len = group.len();
            drop(group);
            let done = stepper.step(
                &setup.model.params,
                grads,
                examples,
                &mut state,
                &plan.faults,
                &record.progress,
            )?;
            state.global_step += 1;
            at.step = state.global_step;
            state.data_position = batches.position_after(group_len);
            state.data_stream = batches.stream_state(world)?;
            let per_epoch = plan.stream_samples.unwrap_or(plan.examples.len());
            state.epoch = batches.epoch as f64
                + if per_epoch > 0 {
                    (state.data_position as f64 / per_epoch as f64).min(1.0)
                } else {
                    batches.stream_progress().unwrap_or(0.0)
                };
            record.step(&mut state, &done, &gpu, world)?;
            let step = state.global_step as usize;
            if plan.evaluates_at(step, args, setup) {
                evaluate_at(step, setup, args, world, &mut state, &mut record, at)?;
            }
            let mut saved = None;
            if plan.saves_at(step, world) {
                at.saving = true;
                let p = save(&stepper, &state)?;
                at.saving = false;
                record.progress.log(&format!("saved {}", p.display()));
                saved = Some(p);
            }
            if world.is_distributed()
                && args.sync_check_steps > 0
                && step.is_multiple_of(args.sync_check_steps)
            {
                check_replicas(world, &setup.model.params, state.global_step)?;
            }
            if step >= plan.total {
                break 'epochs;
            }
            let mut stop = done.stop;
            if plan.faults.wait_for_signal(step as u64) && !world.is_distributed() {
                stop = interrupted();
            }
            if let Some(signal) = stop {
                // Stop with a checkpoint of this step.
                plan.faults.hold_at_interrupt();
                let p = match saved {
                    Some(p) => p,
                    None if world.is_main() => {
                        at.saving = true;
                        save(&stepper, &state)?
                    }
                    None => checkpoint::checkpoint_dir(&args.output_dir, state.global_step),
                };
                record.progress.finish();
                // The other ranks wait for rank 0's save: mpirun ends the
                // job when the first process exits.
                world.barrier();
                return Err(stopped_by(signal, step, plan.total, &p));
            }
            if end_of_epoch {
                break;
            }
        }
        state.data_epoch += 1;
        state.data_position = 0;
        state.data_stream = None;
    }
    record.progress.finish();
    gpu.sync()?;
    // The final state as a checkpoint too, so a finished run can be extended.
    if world.is_main() {
        at.saving = true;
        save(&stepper, &state)?;
        at.saving = false;
    }
    let train = record.results(&state, t0.elapsed().as_secs_f64(), world);
    if world.is_main() {
        training_results(args, &train, &state, &plan.run_info, &record.chart)?;
    }
    if let Value::Object(m) = train {
        results.extend(m);
    }
    record.summary(&state);
    Ok(state)
}

/// The evaluation during training after `step`, logged and kept in the
/// history; an interrupt cuts it short (the step's checkpoint follows).
fn evaluate_at(
    step: usize,
    setup: &Setup,
    args: &TrainArgs,
    world: &World,
    state: &mut RunState,
    record: &mut Record,
    at: &mut Whereabouts,
) -> Result<()> {
    at.evaluating = true;
    let r = evaluate(setup, &setup.eval, args, world);
    at.evaluating = false;
    match r {
        Ok(r) => record.eval(step, &r, state),
        // The step's checkpoint follows; the evaluation is not in the log.
        Err(e) if e.is::<Interrupted>() => {
            record
                .progress
                .log(&format!("step {step}: evaluation cut short"));
            Ok(())
        }
        Err(e) => Err(e),
    }
}

/// The error of a run that `signal` stopped after `step` of `total`, with
/// the checkpoint `p` to resume from.
fn stopped_by(signal: i32, step: usize, total: usize, p: &Path) -> anyhow::Error {
    Interrupted {
        signal,
        message: format!(
            "stopped after step {step} of {total} and saved {}. Run the same command again to \
             resume from it (or pass --resume_from_checkpoint {})",
            p.display(),
            p.display()
        ),
    }
    .into()
}

/// A checkpoint resumes only in the precision it was trained in: f16 runs
/// carry the loss scaler's state (HF's scaler.pt), and another precision
/// would not continue the same computation. Checkpoints that predate the
/// record were f32.
fn check_resume_precision(dir: &Path, run: &Value, state: &RunState, now: Precision) -> Result<()> {
    let flag = |p: Precision| match p {
        Precision::F32 => "neither --fp16 nor --bf16",
        Precision::F16 => "--fp16",
        Precision::Bf16 => "--bf16",
    };
    let was = match run.get("precision").and_then(Value::as_str) {
        Some(p) => Precision::parse(p)
            .with_context(|| format!("{}: its recorded precision", dir.display()))?,
        None => Precision::F32,
    };
    ensure!(
        was == now,
        "cannot resume from {}: it was trained in {} ({}) and this run asks for {} ({}); \
         resume with the precision it was trained in, or start a new run (--model_name_or_path {} \
         takes its weights)",
        dir.display(),
        was.name(),
        flag(was),
        now.name(),
        flag(now),
        dir.display()
    );
    ensure!(
        (now == Precision::F16) == state.grad_scaler.is_some(),
        "cannot resume from {}: its trainer_state.json {} the fp16 loss scaler's state, which a {} run {}",
        dir.display(),
        if state.grad_scaler.is_some() { "holds" } else { "lacks" },
        now.name(),
        if now == Precision::F16 { "needs" } else { "does not use" }
    );
    Ok(())
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

/// How the run that saved a checkpoint differs from this WebDataset run in
/// what fixes its stream: the shards, the shuffle buffer, the ranks they
/// are dealt to.
fn stream_differences(run: &Value, setup: &Setup, args: &TrainArgs, world: &World) -> Vec<String> {
    let Some(set) = &setup.train_stream else {
        return Vec::new();
    };
    let mut out = Vec::new();
    let now = [
        ("train_shards", "training shards", set.shards.len()),
        (
            "shuffle_buffer",
            "as shuffle buffer",
            args.shuffle_buffer.max(1),
        ),
    ];
    for (k, what, n) in now {
        match run.get(k).and_then(Value::as_u64) {
            Some(w) if w as usize != n => out.push(format!(
                "the checkpoint's run had {w} {what}, this one has {n}"
            )),
            Some(_) => {}
            None => out.push(format!(
                "the checkpoint's run did not read WebDataset shards, this one reads {}",
                set.shards.len()
            )),
        }
    }
    let ranks = run.get("world_size").and_then(Value::as_u64).unwrap_or(1) as usize;
    if ranks != world.size() {
        out.push(format!(
            "the checkpoint's run dealt the shards to {ranks} rank(s), this one to {}",
            world.size()
        ));
    }
    let cap = run.get("stream_samples_per_epoch").and_then(Value::as_u64);
    let cap_now = args
        .max_train_samples
        .map(|m| (m / world.size()).max(1) as u64);
    if cap != cap_now {
        out.push(format!(
            "the checkpoint's run ended its epochs at {}, this one at {}",
            cap.map_or("the end of the shards".into(), |c| format!("{c} samples")),
            cap_now.map_or("the end of the shards".into(), |c| format!("{c} samples"))
        ));
    }
    out.dedup();
    out.truncate(3);
    out
}

/// A WebDataset run's samples per epoch on this rank: --max_train_samples
/// (which caps each rank's epoch at its share), else the shards counted
/// when the schedule needs it (--num_train_epochs), else unknown. Returns
/// (samples, cap).
fn stream_epoch(
    args: &TrainArgs,
    set: &crate::data::webdataset::ShardSet,
    world: &World,
) -> Result<(Option<usize>, Option<usize>)> {
    let w = world.size();
    if let Some(m) = args.max_train_samples {
        let per = (m / w).max(1);
        return Ok((Some(per), Some(per)));
    }
    if args.max_steps > 0 {
        return Ok((None, None));
    }
    let t0 = Instant::now();
    let n = crate::data::webdataset::count_samples(set)?;
    log(&format!(
        "counted {n} samples in {} shard(s) in {:.1} s for the schedule (--max_steps or \
         --max_train_samples skip this)",
        set.shards.len(),
        t0.elapsed().as_secs_f64()
    ));
    ensure!(
        n > 0,
        "the WebDataset shards {} hold no usable sample",
        set.spec
    );
    Ok((Some((n / w).max(1)), None))
}

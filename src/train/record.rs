//! What a training run records as it goes: the progress display, a line
//! every `--logging_steps` (to the log, metrics.jsonl and the run's
//! log_history that checkpoints keep), evaluations, and the totals that
//! train_results.json reports.

use super::args::TrainArgs;
use super::checkpoint::RunState;
use super::evaluate::{eval_json, EvalResult};
use super::metrics::{ChartData, MetricsLog};
use super::progress::{log, Progress};
use super::step::StepDone;
use crate::data::loader::LoadedBatch;
use crate::dist::{self, World};
use crate::Gpu;
use anyhow::Result;
use serde_json::{json, Value};
use std::time::Instant;

pub(super) struct Record {
    pub(super) progress: Progress,
    metrics: Option<MetricsLog>,
    /// Optimizer steps of the run, and a log line every this many.
    total: usize,
    log_every: usize,
    /// Finite losses summed and counted since the last log line.
    window: (f64, usize),
    last_log: Instant,
    images_since: usize,
    steps_since: usize,
    /// The loss chart's series: the resumed history's, then each new log
    /// entry's (train and eval loss, learning rate).
    pub(super) chart: ChartData,
    /// Collectives of this rank over the run.
    comm_total: dist::CommStats,
    /// Pictures skipped as unreadable.
    skipped_total: usize,
    total_loss: f64,
    loss_steps: usize,
    steps_run: usize,
    examples_run: usize,
}

impl Record {
    /// The record of a run of `total` steps from `state` (a resumed run's
    /// history included); rank 0 alone writes metrics.jsonl and shows
    /// progress.
    pub(super) fn open(
        args: &TrainArgs,
        total: usize,
        log_every: usize,
        state: &RunState,
        world: &World,
    ) -> Result<Record> {
        let main = world.is_main();
        let metrics = if main {
            Some(MetricsLog::open(&args.output_dir.join("metrics.jsonl"))?)
        } else {
            None
        };
        let progress = if main {
            Progress::new(total as u64, state.global_step, !args.no_progress)
        } else {
            Progress::silent(total as u64, state.global_step)
        };
        Ok(Record {
            progress,
            metrics,
            total,
            log_every,
            window: (0.0, 0),
            last_log: Instant::now(),
            images_since: 0,
            steps_since: 0,
            chart: ChartData::from_records(state.log_history.iter().filter_map(Value::as_object)),
            comm_total: dist::CommStats::default(),
            skipped_total: 0,
            total_loss: 0.0,
            loss_steps: 0,
            steps_run: 0,
            examples_run: 0,
        })
    }

    /// Count (and log the first few of) the pictures a group skipped.
    pub(super) fn skipped_pictures(&mut self, group: &[LoadedBatch]) {
        for b in group {
            for (p, why) in &b.skipped {
                self.skipped_total += 1;
                if self.skipped_total <= 5 {
                    log(&format!("skipped {}: {why}", p.display()));
                }
            }
        }
    }

    /// A step done (`state` already advanced past it): counted, shown, and
    /// logged when a log line is due.
    pub(super) fn step(
        &mut self,
        state: &mut RunState,
        done: &StepDone,
        gpu: &Gpu,
        world: &World,
    ) -> Result<()> {
        self.images_since += done.examples;
        self.steps_since += 1;
        self.steps_run += 1;
        self.examples_run += done.examples;
        if done.finite || done.scaler_skipped {
            self.total_loss += done.loss;
            self.loss_steps += 1;
            self.window.0 += done.loss;
            self.window.1 += 1;
        }
        self.progress
            .step(state.global_step, done.loss, done.lr as f64, done.examples);
        let step = state.global_step as usize;
        if self.log_every > 0 && (step.is_multiple_of(self.log_every) || step == self.total) {
            self.log_line(state, done, gpu, world)?;
        }
        Ok(())
    }

    /// The log line of `step`: loss over the steps since the last line,
    /// learning rate, gradient norm, throughput, GPU pool and (across
    /// ranks) time in collectives.
    fn log_line(
        &mut self,
        state: &mut RunState,
        done: &StepDone,
        gpu: &Gpu,
        world: &World,
    ) -> Result<()> {
        let (step, total, lr) = (state.global_step as usize, self.total, done.lr);
        let dt = self.last_log.elapsed().as_secs_f64();
        let pool = gpu.pool_stats();
        let mib = |b: u64| b as f64 / 1048576.0;
        let mut entry = json!({
            "grad_norm": done.norm,
            "learning_rate": lr,
            "epoch": state.epoch,
            "step": step,
            "images_per_second": self.images_since as f64 / dt.max(1e-9),
            "pool_mib": mib(pool.held_bytes),
            "pool_peak_mib": mib(pool.peak_bytes),
        });
        let loss = (self.window.1 > 0).then(|| self.window.0 / self.window.1 as f64);
        if let Some(l) = loss {
            entry["loss"] = json!(l);
        }
        if state.skipped_nonfinite_steps > 0 {
            entry["skipped_nonfinite_steps"] = json!(state.skipped_nonfinite_steps);
        }
        // fp16: the scale after this step's update, and the steps the
        // scaler skipped so far.
        let mut scale_note = String::new();
        if let Some(s) = &state.grad_scaler {
            entry["loss_scale"] = json!(s.scale);
            if s.skipped_steps > 0 {
                entry["loss_scale_skipped_steps"] = json!(s.skipped_steps);
            }
            scale_note = format!(", loss scale {}", s.scale);
        }
        let mut comm = String::new();
        if world.is_distributed() {
            // Collectives of this rank (rank 0's, as it logs).
            let c = world.take_stats();
            let per = self.steps_since.max(1) as f64;
            entry["mpi_seconds_per_step"] = json!(c.seconds / per);
            entry["mpi_mib_sent_per_step"] = json!(mib(c.bytes_sent) / per);
            comm = format!(
                ", MPI {:.1} ms and {:.2} MiB sent per step",
                c.seconds * 1e3 / per,
                mib(c.bytes_sent) / per
            );
            self.comm_total.calls += c.calls;
            self.comm_total.seconds += c.seconds;
            self.comm_total.bytes_sent += c.bytes_sent;
        }
        self.steps_since = 0;
        self.progress.log(&format!(
            "step {step}/{total}: loss {}, lr {:.3e}, grad_norm {:.3}{scale_note}, {:.1} images/s, \
             GPU pool peak {:.0} MiB{comm}",
            loss.map_or("- (skipped)".into(), |l| format!("{l:.4}")),
            lr,
            done.norm,
            self.images_since as f64 / dt.max(1e-9),
            mib(pool.peak_bytes)
        ));
        if let Some(m) = self.metrics.as_mut() {
            m.write(&entry)?;
        }
        if let Some(m) = entry.as_object() {
            self.chart.push_record(m);
        }
        state.log_history.push(entry);
        self.window = (0.0, 0);
        self.images_since = 0;
        self.last_log = Instant::now();
        Ok(())
    }

    /// The evaluation after `step`: logged and kept in the history.
    pub(super) fn eval(&mut self, step: usize, r: &EvalResult, state: &mut RunState) -> Result<()> {
        let mut entry = eval_json(r, state.epoch, "eval_");
        entry["step"] = json!(step);
        if let Some(m) = self.metrics.as_mut() {
            m.write(&entry)?;
        }
        self.progress
            .log(&format!("step {step}: eval_loss {:.4}", r.loss));
        if let Some(m) = entry.as_object() {
            self.chart.push_record(m);
        }
        state.log_history.push(entry);
        Ok(())
    }

    /// train_results.json's figures for a run of `runtime` seconds.
    pub(super) fn results(&mut self, state: &RunState, runtime: f64, world: &World) -> Value {
        let mut train = json!({
            "epoch": state.epoch,
            "train_loss": self.total_loss / self.loss_steps.max(1) as f64,
            "train_runtime": runtime,
            "train_samples_per_second": self.examples_run as f64 / runtime.max(1e-9),
            "train_steps_per_second": self.steps_run as f64 / runtime.max(1e-9),
            "train_skipped_images": self.skipped_total,
            "train_skipped_nonfinite_steps": state.skipped_nonfinite_steps,
        });
        if let Some(s) = &state.grad_scaler {
            train["train_loss_scale"] = json!(s.scale);
            train["train_loss_scale_skipped_steps"] = json!(s.skipped_steps);
        }
        if world.is_distributed() {
            let c = world.take_stats();
            self.comm_total.seconds += c.seconds;
            self.comm_total.bytes_sent += c.bytes_sent;
            train["world_size"] = json!(world.size());
            train["mpi_seconds"] = json!(self.comm_total.seconds);
            train["mpi_mib_sent"] = json!(self.comm_total.bytes_sent as f64 / 1048576.0);
        }
        train
    }

    /// The closing lines: what was skipped over the run.
    pub(super) fn summary(&self, state: &RunState) {
        if self.skipped_total > 0 {
            log(&format!(
                "skipped {} unreadable image(s) in total",
                self.skipped_total
            ));
        }
        if state.skipped_nonfinite_steps > 0 {
            log(&format!(
                "skipped {} optimizer step(s) with a non-finite loss or gradient (--skip_nonfinite_steps)",
                state.skipped_nonfinite_steps
            ));
        }
        if let Some(s) = state.grad_scaler.as_ref().filter(|s| s.skipped_steps > 0) {
            log(&format!(
                "the fp16 loss scaler skipped {} optimizer step(s) whose gradients overflowed; \
                 final loss scale {}",
                s.skipped_steps, s.scale
            ));
        }
    }
}

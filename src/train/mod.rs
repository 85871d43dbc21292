//! `clip-wgpu train`: the training run of transformers'
//! `examples/pytorch/contrastive-image-text/run_clip.py` with its `Trainer`.
//!
//! - [`args`]: the command line, as `HfArgumentParser` reads it for
//!   run_clip.py (`ModelArguments`, `DataTrainingArguments`,
//!   `TrainingArguments`), plus this tool's own flags.
//! - [`schedule`]: learning rate per optimizer step, as
//!   `transformers.get_scheduler` computes it.
//! - [`scaler`]: `--fp16`'s dynamic loss scaling (PyTorch's GradScaler).
//! - [`accumulate`]: a step's gradients from several micro-batches, with
//!   one contrastive loss over all of them (gradient caching).
//! - [`metrics`]: retrieval recall@K, the JSON-lines metrics log and the loss
//!   chart.
//! - [`trainer`]: the run and the training loop's outline, with its parts in
//!   private modules: `setup`, `batches`, `step`, `record`, `evaluate`,
//!   `save` and `faults`.

pub mod accumulate;
pub mod args;
mod batches;
pub mod checkpoint;
mod evaluate;
mod faults;
pub mod metrics;
pub mod optimizer;
pub mod progress;
mod record;
mod save;
pub mod scaler;
pub mod schedule;
mod setup;
mod step;
pub mod trainer;

//! What a run writes: checkpoints (never from non-finite weights), the
//! final model, and the result files run_clip.py's Trainer writes.

use super::args::TrainArgs;
use super::checkpoint::{self, RunState};
use super::faults::Faults;
use super::metrics::{loss_curve_png, ChartData};
use super::optimizer::Optimizer;
use super::progress::log;
use super::schedule::Schedule;
use super::setup::Setup;
use super::step::{list_names, nonfinite_tensors};
use crate::model::params::ParamStore;
use crate::model::weights::write_atomic;
use crate::ops::adamw::grad_norm;
use crate::tensor::Tensor;
use anyhow::{bail, Result};
use serde_json::Value;
use std::path::{Path, PathBuf};

pub(super) fn write_json(p: &Path, v: &Value) -> Result<()> {
    write_atomic(p, serde_json::to_string_pretty(v)?.as_bytes())
}

/// Write a checkpoint of the current state (never from non-finite weights).
#[allow(clippy::too_many_arguments)]
pub(super) fn save_checkpoint(
    args: &TrainArgs,
    setup: &Setup,
    opt: &Optimizer,
    state: &RunState,
    schedule: &Schedule,
    run_info: &Value,
    faults: &Faults,
) -> Result<PathBuf> {
    check_finite_weights(&setup.model.params)?;
    faults.before_save(state.global_step, setup.model.params.params[0].tensor.gpu());
    let p = checkpoint::save_checkpoint(
        &args.output_dir,
        &setup.model,
        opt,
        state,
        &schedule.to_json(state.scheduler_step()),
        run_info,
        &setup.processing,
    )?;
    if let Some(limit) = args.save_total_limit {
        checkpoint::rotate(&args.output_dir, limit)?;
    }
    Ok(p)
}

/// Refuse to save weights that are not all finite (one small readback: the
/// norm of all weights; the names only when it is not finite).
pub(super) fn check_finite_weights(params: &ParamStore) -> Result<()> {
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

/// The trained model (and its tokenizer and processor files) in the output
/// folder, as transformers loads it (never from non-finite weights).
pub(super) fn save_model(args: &TrainArgs, setup: &Setup, main: bool) -> Result<()> {
    check_finite_weights(&setup.model.params)?;
    if main {
        checkpoint::save_model_as(
            &args.output_dir,
            &setup.model,
            &setup.processing,
            args.save_dtype,
        )?;
        log(&format!(
            "saved the model ({}) to {}",
            args.save_dtype.name(),
            args.output_dir.display()
        ));
    }
    Ok(())
}

/// The end of training's files: train_results.json, trainer_state.json
/// (with `run_info`) and the loss chart.
pub(super) fn training_results(
    args: &TrainArgs,
    train: &Value,
    state: &RunState,
    run_info: &Value,
    chart: &ChartData,
) -> Result<()> {
    write_json(&args.output_dir.join("train_results.json"), train)?;
    write_json(
        &args.output_dir.join("trainer_state.json"),
        &state.to_json(run_info),
    )?;
    loss_curve_png(&args.output_dir.join("loss_curve.png"), chart)
}

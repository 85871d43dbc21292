//! One optimizer step from an accumulation group's gradients: summed
//! across ranks (which agree on a stop request at the same time), the
//! global norm read back, and the update applied when the loss and the
//! norm are finite, else skipped (`--skip_nonfinite_steps`) or the run
//! stopped with [`NonFinite`], naming what is not finite.

use super::accumulate::GroupGrads;
use super::args::TrainArgs;
use super::checkpoint::RunState;
use super::faults::{interrupted, resume_note, Faults, NonFinite, SIGTERM};
use super::optimizer::Optimizer;
use super::progress::Progress;
use super::schedule::Schedule;
use crate::dist::{self, World};
use crate::model::clip::ClipModel;
use crate::model::params::ParamStore;
use crate::ops::adamw::{grad_norm, AdamW};
use crate::ops::clamp::clamp_inplace;
use crate::ops::reduce::sumsq;
use crate::tensor::Tensor;
use anyhow::{ensure, Result};

/// OpenCLIP's guard: logit_scale <= ln(100) (run_clip.py has none).
const MAX_LOGIT_SCALE: f32 = 4.605_170_2;

/// What one step did.
pub(super) struct StepDone {
    pub(super) lr: f32,
    /// The step's loss.
    pub(super) loss: f64,
    /// The global gradient norm before clipping (unscaled with fp16).
    pub(super) norm: f32,
    /// Whether the weights were updated (else the loss or gradients were
    /// not finite and the step was skipped).
    pub(super) finite: bool,
    /// Skipped by the fp16 loss scaler (its loss still counts, as in the
    /// Trainer).
    pub(super) scaler_skipped: bool,
    /// Examples in the step, over all ranks.
    pub(super) examples: usize,
    /// A signal that asks the run to stop after this step (on any rank).
    pub(super) stop: Option<i32>,
}

/// The optimizer, the learning rate schedule and what a step needs of the
/// parameters.
pub(super) struct Stepper<'a> {
    args: &'a TrainArgs,
    world: &'a World,
    pub(super) opt: Optimizer,
    pub(super) schedule: Schedule,
    trainable: Vec<bool>,
    shapes: Vec<Vec<usize>>,
    /// logit_scale's index: clamped after each update; its gradient is
    /// whole on every rank.
    ls_index: usize,
    /// Non-finite steps skipped in a row (--max_consecutive_nonfinite_steps).
    skipped_in_a_row: usize,
}

impl<'a> Stepper<'a> {
    /// AdamW with the arguments' settings and schedule over `total` steps
    /// after `warmup`.
    pub(super) fn new(
        args: &'a TrainArgs,
        model: &ClipModel,
        total: usize,
        warmup: usize,
        world: &'a World,
    ) -> Result<Stepper<'a>> {
        let schedule = Schedule::with_kwargs(
            &args.lr_scheduler_type,
            args.learning_rate,
            warmup as u64,
            total as u64,
            &args.lr_scheduler_kwargs,
        )?;
        let hp = AdamW {
            lr: args.learning_rate as f32,
            beta1: args.adam_beta1 as f32,
            beta2: args.adam_beta2 as f32,
            eps: args.adam_epsilon as f32,
            weight_decay: args.weight_decay as f32,
        };
        let opt = Optimizer::new(&model.params, hp, args.max_grad_norm as f32)?;
        let params = &model.params.params;
        Ok(Stepper {
            args,
            world,
            opt,
            schedule,
            trainable: params.iter().map(|p| p.trainable).collect(),
            shapes: params.iter().map(|p| p.tensor.shape().to_vec()).collect(),
            ls_index: model.logit_scale,
            skipped_in_a_row: 0,
        })
    }

    /// The step after `state.global_step` from `out`, this rank's gradients
    /// of `examples` examples. Does not advance `state` (but counts a
    /// skipped step in it).
    pub(super) fn step(
        &mut self,
        params: &ParamStore,
        out: GroupGrads,
        examples: usize,
        state: &mut RunState,
        faults: &Faults,
        progress: &Progress,
    ) -> Result<StepDone> {
        let (args, world) = (self.args, self.world);
        let step_no = state.global_step + 1;
        // The Trainer steps the schedule only after updates (the loss
        // scaler's skipped steps hold it back).
        let lr = self.schedule.lr_at(state.scheduler_step()) as f32;
        let mut grads = out.grads;
        faults.poison_gradient(step_no, params, &grads)?;
        // Across ranks: sum the gradients (logit_scale's is whole on
        // every rank: counted once), and agree on a stop request.
        let mut stop = interrupted();
        let mut examples = examples;
        if world.is_distributed() {
            let asked = f32::from(u8::from(stop.is_some()));
            let flags = dist::all_reduce_grads(
                world,
                &self.trainable,
                &mut grads,
                &self.shapes,
                &[self.ls_index],
                &[asked, examples as f32],
            )?;
            stop = (flags[0] > 0.0).then(|| interrupted().unwrap_or(SIGTERM));
            examples = flags[1] as usize;
        }
        // The step's readback: [norm, coef] (then the losses, read
        // after the norm so that a step waits for the GPU once). Every
        // rank reads the norm of the same summed gradients, so all take
        // the same decision below.
        let norm = self.opt.grad_norm(params, &grads)?;
        let nv = norm.to_vec()?;
        let mut step_loss = 0.0f64;
        for l in &out.losses {
            step_loss += l.to_vec()?[0] as f64 * out.loss_weight;
        }
        if faults.at("nan_loss", step_no).is_some() {
            step_loss = f64::NAN;
        }
        // fp16: the gradients are `scale` times the true ones.
        let scale = state.grad_scaler.as_ref().map(|s| s.scale);
        let true_norm = scale.map_or(nv[0], |s| nv[0] / s);
        let finite = step_loss.is_finite() && nv[0].is_finite();
        let mut scaler_skipped = false;
        if finite {
            self.skipped_in_a_row = 0;
            if let Some(scale) = scale {
                self.opt.unscale(&norm, true_norm, scale)?;
            }
            self.opt.apply(params, &grads, &norm, lr)?;
            clamp_inplace(
                &params.params[self.ls_index].tensor,
                f32::MIN,
                MAX_LOGIT_SCALE,
            )?;
            if let Some(s) = state.grad_scaler.as_mut() {
                s.update(false);
            }
        } else if let Some(s) = state.grad_scaler.as_mut() {
            // GradScaler: gradients that overflowed at this scale; skip
            // the update and back off (not a fault: expected now and then).
            // A loss that overflowed in the f16 forward too: its gradients
            // are not finite either, and PyTorch's scaler skips those.
            let old = s.scale;
            s.update(true);
            scaler_skipped = true;
            let new = s.scale;
            let what = nonfinite_report(params, &grads, step_loss, nv[0])?;
            progress.log(&format!(
                "step {step_no}: {what} at loss scale {old}: skipped (fp16 loss scaling), \
                 the weights and the learning rate schedule were not stepped; loss scale {old} -> {new}"
            ));
            if new < f32::MIN_POSITIVE {
                progress.finish();
                return Err(NonFinite(format!(
                    "training step {step_no}: {what}. The fp16 loss scale fell to {new} after {} skipped \
                     steps: the gradients are not finite at any scale (a NaN, not an overflow). The weights \
                     stay finite; {}. Check the data, lower --learning_rate, or train with --bf16 or in f32",
                    s.skipped_steps,
                    resume_note(args)
                ))
                .into());
            }
        } else {
            let what = nonfinite_report(params, &grads, step_loss, nv[0])?;
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
            self.skipped_in_a_row += 1;
            let skipped_in_a_row = self.skipped_in_a_row;
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
        Ok(StepDone {
            lr,
            loss: step_loss,
            norm: true_norm,
            finite,
            scaler_skipped,
            examples,
            stop,
        })
    }
}

// ---------------------------------------------------------------------------
// Numerical checks.

/// Sums of squares of the given tensors, one small readback each (only on
/// the failure path): the names of those that are not finite.
pub(super) fn nonfinite_tensors<'a>(
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

pub(super) fn list_names(names: &[String]) -> String {
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

/// Fail unless every rank holds the same weights after `step` steps: the
/// norm of all weights and logit_scale, compared bit for bit (one small
/// readback and one gather).
pub(super) fn check_replicas(world: &World, params: &ParamStore, step: u64) -> Result<()> {
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

//! AdamW over a model's parameter store, as the Trainer sets it up: weight
//! decay for all but biases and LayerNorm weights, global gradient-norm
//! clipping (max_grad_norm), and its state as named tensors for checkpoints.

use crate::model::params::{decays, ParamStore};
use crate::model::weights::{HostTensor, Weights};
use crate::ops::adamw::{adamw_step, grad_norm, AdamW};
use crate::tensor::Tensor;
use anyhow::{ensure, Context, Result};

pub struct Optimizer {
    pub hp: AdamW,
    /// Clip the global gradient norm to this (<= 0: no clipping).
    pub max_grad_norm: f32,
    /// Updates taken so far (torch's `state["step"]`).
    pub step: u64,
    m: Vec<Tensor>,
    v: Vec<Tensor>,
}

impl Optimizer {
    pub fn new(params: &ParamStore, hp: AdamW, max_grad_norm: f32) -> Result<Optimizer> {
        let mut m = Vec::new();
        let mut v = Vec::new();
        for p in &params.params {
            let gpu = p.tensor.gpu();
            m.push(Tensor::zeros(gpu, p.tensor.shape())?);
            v.push(Tensor::zeros(gpu, p.tensor.shape())?);
        }
        Ok(Optimizer {
            hp,
            max_grad_norm,
            step: 0,
            m,
            v,
        })
    }

    /// [global gradient norm, clip coefficient] on the GPU, from the
    /// gradients present. The trainer reads these two numbers back to check
    /// them before [`Optimizer::apply`] (a non-finite norm means a NaN or
    /// infinite gradient somewhere).
    pub fn grad_norm(&self, params: &ParamStore, grads: &[Option<Tensor>]) -> Result<Tensor> {
        ensure!(
            grads.len() == params.params.len(),
            "one gradient slot per parameter"
        );
        let present: Vec<&Tensor> = grads.iter().flatten().collect();
        ensure!(
            !present.is_empty(),
            "no parameter has a gradient: is every tower frozen?"
        );
        let clip_at = if self.max_grad_norm > 0.0 {
            self.max_grad_norm
        } else {
            f32::INFINITY
        };
        grad_norm(&present, clip_at)
    }

    /// fp16's unscaling: `norm` (from [`Optimizer::grad_norm`]) is of
    /// gradients `scale` times the true ones, whose norm is `true_norm`.
    /// Rewrites it as [true_norm, clip coefficient / scale], so that
    /// [`Optimizer::apply`] multiplies each gradient by 1/scale with the
    /// clipping: with a power-of-two scale the update is bit for bit the
    /// unscaled one (torch's `scaler.unscale_` then `clip_grad_norm_`).
    pub fn unscale(&self, norm: &Tensor, true_norm: f32, scale: f32) -> Result<()> {
        let clip_at = if self.max_grad_norm > 0.0 {
            self.max_grad_norm
        } else {
            f32::INFINITY
        };
        // clip_grad_norm_'s coefficient, as the norm kernel computes it.
        let coef = (clip_at / (true_norm + 1e-6)).min(1.0);
        norm.write(&[true_norm, coef / scale])
    }

    /// The AdamW update at learning rate `lr`, clipping with `norm` (from
    /// [`Optimizer::grad_norm`]). Parameters without a gradient (frozen) are
    /// left alone, as torch does.
    pub fn apply(
        &mut self,
        params: &ParamStore,
        grads: &[Option<Tensor>],
        norm: &Tensor,
        lr: f32,
    ) -> Result<()> {
        ensure!(
            grads.len() == params.params.len(),
            "one gradient slot per parameter"
        );
        self.step += 1;
        let hp = AdamW { lr, ..self.hp };
        for (i, (p, g)) in params.params.iter().zip(grads).enumerate() {
            if let Some(g) = g {
                adamw_step(
                    &p.tensor,
                    g,
                    &self.m[i],
                    &self.v[i],
                    self.step,
                    &hp,
                    decays(&p.name),
                    Some(norm),
                )?;
            }
        }
        Ok(())
    }

    /// exp_avg.<name> and exp_avg_sq.<name> for every parameter, plus `step`.
    pub fn state(&self, params: &ParamStore) -> Result<Vec<(String, HostTensor)>> {
        let mut out = Vec::new();
        for (i, p) in params.params.iter().enumerate() {
            let s = p.tensor.shape();
            out.push((
                format!("exp_avg.{}", p.name),
                HostTensor::new(s, self.m[i].to_vec()?),
            ));
            out.push((
                format!("exp_avg_sq.{}", p.name),
                HostTensor::new(s, self.v[i].to_vec()?),
            ));
        }
        // The step count as an exact f32 integer (below 2^24 steps).
        out.push(("step".into(), HostTensor::new(&[1], vec![self.step as f32])));
        Ok(out)
    }

    pub fn load_state(&mut self, params: &ParamStore, w: &Weights, what: &str) -> Result<()> {
        for (i, p) in params.params.iter().enumerate() {
            for (kind, dst) in [("exp_avg", &self.m[i]), ("exp_avg_sq", &self.v[i])] {
                let name = format!("{kind}.{}", p.name);
                let t = w
                    .get(&name)
                    .with_context(|| format!("optimizer state in {what}"))?;
                ensure!(
                    t.data.len() == dst.numel(),
                    "{what}: {name} has {} values, the model needs {}",
                    t.data.len(),
                    dst.numel()
                );
                dst.write(&t.data)?;
            }
        }
        self.step = w
            .get("step")
            .with_context(|| format!("optimizer state in {what}"))?
            .data[0] as u64;
        Ok(())
    }
}

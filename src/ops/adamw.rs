//! The optimizer: torch.optim.AdamW (decoupled weight decay) updating
//! parameters in place, and the global gradient norm with the clip
//! coefficient of torch.nn.utils.clip_grad_norm_, kept on the GPU so that a
//! training step never waits for a readback.

use super::{by_vec4, f, reduce, shader, u};
use crate::gpu::{Shader, Window};
use crate::tensor::Tensor;
use anyhow::{ensure, Result};

const SHADER: Shader = shader!("adamw");

/// Hyperparameters (Default: torch's AdamW and the Hugging Face Trainer's
/// defaults: lr 5e-5, betas (0.9, 0.999), eps 1e-8, weight decay 0).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamW {
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
}

impl Default for AdamW {
    fn default() -> Self {
        AdamW {
            lr: 5e-5,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        }
    }
}

/// Global L2 norm of all gradients and the clip coefficient, as a [2]
/// tensor [total_norm, coef] with total = sqrt(sum of every g^2) and
/// coef = min(1, max_norm / (total + 1e-6)) (clip_grad_norm_). Fixed
/// chunks summed in a fixed order, so the result is deterministic.
pub fn grad_norm(grads: &[&Tensor], max_norm: f32) -> Result<Tensor> {
    ensure!(!grads.is_empty(), "grad_norm: no gradients");
    let gpu = grads[0].gpu();
    // Every tensor's partial sums of squares in one buffer, summed in order
    // by the norm kernel: one dispatch per tensor, not three.
    let total: usize = grads
        .iter()
        .map(|g| reduce::sumsq_partials(g.numel()))
        .sum();
    let partials = Tensor::empty(gpu, &[total])?;
    let mut offset = 0;
    for g in grads {
        reduce::sumsq_partials_into(g, &partials, offset)?;
        offset += reduce::sumsq_partials(g.numel());
    }
    // Summed in chunks, then the chunk sums (not one long running sum).
    let sum = reduce::colsum(&partials, total, 1)?;
    let out = Tensor::empty(gpu, &[2])?;
    let mut params = [0u32; 12];
    params[9] = f(max_norm);
    gpu.dispatch(
        &SHADER,
        "norm",
        &params,
        &[Some(sum.buffer()), Some(out.buffer())],
        [1, 1, 1],
    )?;
    Ok(out)
}

/// The kernel parameters of one step: decay factor, 1 - b1, b2, 1 - b2,
/// step size and sqrt of the second bias correction, from f64 as torch
/// computes them in Python floats.
fn step_params(n: usize, step: u64, hp: &AdamW, decay: bool, has_clip: bool) -> [u32; 12] {
    let (lr, b1, b2) = (hp.lr as f64, hp.beta1 as f64, hp.beta2 as f64);
    let factor = if decay {
        1.0 - lr * hp.weight_decay as f64
    } else {
        1.0
    };
    let bc1 = 1.0 - b1.powf(step as f64);
    let bc2 = 1.0 - b2.powf(step as f64);
    [
        u(n),
        has_clip as u32,
        f(factor as f32),
        f((1.0 - b1) as f32),
        f(hp.beta2),
        f((1.0 - b2) as f32),
        f((lr / bc1) as f32),
        f(bc2.sqrt() as f32),
        f(hp.eps),
        0,
        0,
        0,
    ]
}

/// One AdamW step (1-based `step`) in place on `p`, `m` (exp_avg) and `v`
/// (exp_avg_sq). `decay = false` skips weight decay (the Trainer's rule for
/// biases and LayerNorm weights). With `clip` (from `grad_norm`) the
/// gradient is first multiplied by its coefficient.
#[allow(clippy::too_many_arguments)]
pub fn adamw_step(
    p: &Tensor,
    g: &Tensor,
    m: &Tensor,
    v: &Tensor,
    step: u64,
    hp: &AdamW,
    decay: bool,
    clip: Option<&Tensor>,
) -> Result<()> {
    let n = p.numel();
    ensure!(step >= 1, "adamw: steps count from 1");
    for (what, t) in [("gradient", g), ("exp_avg", m), ("exp_avg_sq", v)] {
        ensure!(
            t.numel() == n,
            "adamw: {what} {:?} does not match parameter {:?}",
            t.shape(),
            p.shape()
        );
    }
    ensure!(
        !p.same_storage(g) && !p.same_storage(m) && !p.same_storage(v) && !m.same_storage(v),
        "adamw: parameter, gradient and moments must be distinct buffers"
    );
    if let Some(c) = clip {
        ensure!(
            c.numel() == 2,
            "adamw: clip {:?} is not [total_norm, coef]",
            c.shape()
        );
    }
    let gpu = p.gpu();
    let (entry, lanes) = by_vec4(n.is_multiple_of(4), "step");
    // Windows of the four tensors where they exceed the adapter's binding
    // limit (elementwise, so any split gives the same bits).
    for (e0, len) in gpu.elem_windows(n, lanes) {
        gpu.dispatch_windows(
            &SHADER,
            &entry,
            &[],
            &step_params(len, step, hp, decay, clip.is_some()),
            &[
                Some(Window::elems(g.buffer(), e0, len, n)),
                Some(Window::elems(p.buffer(), e0, len, n)),
                Some(Window::elems(m.buffer(), e0, len, n)),
                Some(Window::elems(v.buffer(), e0, len, n)),
                clip.map(|c| Window::whole(c.buffer())),
            ],
            gpu.grid_1d(len / lanes, 256),
        )?;
    }
    Ok(())
}

/// CPU reference of one step, in f64 (`coef` multiplies the gradient).
#[allow(clippy::too_many_arguments)]
pub fn adamw_ref(
    p: &mut [f64],
    g: &[f64],
    m: &mut [f64],
    v: &mut [f64],
    step: u64,
    hp: &AdamW,
    decay: bool,
    coef: f64,
) {
    let (lr, b1, b2) = (hp.lr as f64, hp.beta1 as f64, hp.beta2 as f64);
    let wd = if decay { hp.weight_decay as f64 } else { 0.0 };
    let bc1 = 1.0 - b1.powf(step as f64);
    let bc2 = 1.0 - b2.powf(step as f64);
    for i in 0..p.len() {
        let gi = g[i] * coef;
        p[i] *= 1.0 - lr * wd;
        m[i] = b1 * m[i] + (1.0 - b1) * gi;
        v[i] = b2 * v[i] + (1.0 - b2) * gi * gi;
        let denom = v[i].sqrt() / bc2.sqrt() + hp.eps as f64;
        p[i] -= lr / bc1 * m[i] / denom;
    }
}

/// CPU reference of `grad_norm`: (total_norm, coef).
pub fn grad_norm_ref(grads: &[&[f64]], max_norm: f64) -> (f64, f64) {
    let total = grads
        .iter()
        .flat_map(|g| g.iter())
        .map(|x| x * x)
        .sum::<f64>()
        .sqrt();
    (total, (max_norm / (total + 1e-6)).min(1.0))
}

//! In-place clamp of a parameter (no gradient: it runs after the optimizer).

use super::{f, shader, u};
use crate::gpu::Shader;
use crate::tensor::Tensor;
use anyhow::Result;

const SHADER: Shader = shader!("clamp");

/// x = min(max(x, lo), hi), on the GPU.
pub fn clamp_inplace(x: &Tensor, lo: f32, hi: f32) -> Result<()> {
    let gpu = x.gpu();
    gpu.dispatch(
        &SHADER,
        "clamp_inplace",
        &[u(x.numel()), f(lo), f(hi), 0],
        &[Some(x.buffer())],
        gpu.grid_1d(x.numel(), 256),
    )
}

pub fn clamp_ref(x: &[f64], lo: f64, hi: f64) -> Vec<f64> {
    x.iter().map(|v| v.max(lo).min(hi)).collect()
}

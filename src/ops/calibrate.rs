//! Peak calibration kernels for `clip-wgpu bench`: FMA throughput and copy
//! bandwidth of this adapter, each with a CPU reference of its output.

use super::{f, shader, u};
use crate::gpu::Shader;
use crate::tensor::Tensor;
use anyhow::Result;

const SHADER: Shader = shader!("calibrate");

/// Multiplier and addend of the FMA chains: |a| stays bounded (fixed point
/// 0.25 / (1 - 0.999) = 250), so no overflow however long the chain.
const MUL: f32 = 0.999;
const ADD: f32 = 0.25;

/// `out` ([4n]) = per thread, the sum of 8 vec4 chains of `iters` FMAs.
/// Returns the floating-point operations done.
pub fn fma_peak(out: &Tensor, n: usize, iters: usize) -> Result<f64> {
    let gpu = out.gpu();
    anyhow::ensure!(out.numel() >= 4 * n, "fma_peak: output too small");
    gpu.dispatch(
        &SHADER,
        "fma_peak",
        &[u(n), u(iters), f(MUL), f(ADD)],
        &[Some(out.buffer())],
        gpu.grid_1d(n, 64),
    )?;
    Ok(n as f64 * iters as f64 * 8.0 * 4.0 * 2.0)
}

/// dst = src (whole vec4s). Returns the bytes moved.
pub fn copy_peak(dst: &Tensor, src: &Tensor) -> Result<f64> {
    let gpu = src.gpu();
    let n = src.numel() / 4;
    anyhow::ensure!(dst.numel() >= 4 * n, "copy_peak: destination too small");
    gpu.dispatch(
        &SHADER,
        "copy_peak",
        &[u(n), 0, 0, 0],
        &[Some(dst.buffer()), Some(src.buffer())],
        gpu.grid_1d(n, 64),
    )?;
    Ok(2.0 * 16.0 * n as f64)
}

/// What fma_peak writes for thread `i` (f32 FMAs, as the kernel does them).
pub fn fma_peak_ref(i: usize, iters: usize) -> [f32; 4] {
    let x = (i % 97) as f32 * 0.01;
    let mut out = [0.0f32; 4];
    for (e, o) in out.iter_mut().enumerate() {
        let a0 = x + 0.1 * e as f32;
        let mut chains: Vec<f32> = (0..8).map(|c| a0 + c as f32).collect();
        for _ in 0..iters {
            for a in chains.iter_mut() {
                *a = a.mul_add(MUL, ADD);
            }
        }
        *o = ((chains[0] + chains[1]) + (chains[2] + chains[3]))
            + ((chains[4] + chains[5]) + (chains[6] + chains[7]));
    }
    out
}

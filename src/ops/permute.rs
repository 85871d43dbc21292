//! Axis swaps: batched transpose and attention head split/merge.

use super::{shader, u};
use crate::gpu::Shader;
use crate::tape::{Tape, Var};
use crate::tensor::Tensor;
use anyhow::{ensure, Result};

const SHADER: Shader = shader!("permute");

/// [a, x, y, z] -> [a, y, x, z].
pub fn swap12(t: &Tensor, dims: [usize; 4]) -> Result<Tensor> {
    let [na, nx, ny, nz] = dims;
    ensure!(
        na * nx * ny * nz == t.numel(),
        "swap12: dims {dims:?} do not match {:?}",
        t.shape()
    );
    let gpu = t.gpu();
    let out = Tensor::empty(gpu, &[na, ny, nx, nz])?;
    gpu.dispatch(
        &SHADER,
        "swap12",
        &[u(na), u(nx), u(ny), u(nz)],
        &[Some(t.buffer()), Some(out.buffer())],
        gpu.grid_1d(t.numel(), 256),
    )?;
    Ok(out)
}

/// [batch, rows, cols] -> [batch, cols, rows].
pub fn transpose(t: &Tensor, batch: usize, rows: usize, cols: usize) -> Result<Tensor> {
    swap12(t, [batch, rows, cols, 1])?.reshape(&[batch, cols, rows])
}

/// Tape op: [a, x, y, z] -> [a, y, x, z]; the backward swaps back.
pub fn swap12_var(tape: &mut Tape, v: &Var, dims: [usize; 4]) -> Result<Var> {
    let out = swap12(v.tensor(), dims)?;
    let [na, nx, ny, nz] = dims;
    let shape = v.shape().to_vec();
    Ok(tape.record(
        out,
        &[v],
        Box::new(move |dy, _| Ok(vec![Some(swap12(dy, [na, ny, nx, nz])?.reshape(&shape)?)])),
    ))
}

/// [B, T, H*D] -> [B, H, T, D].
pub fn split_heads(tape: &mut Tape, v: &Var, heads: usize) -> Result<Var> {
    let s = v.shape();
    ensure!(
        s.len() == 3 && s[2].is_multiple_of(heads),
        "split_heads: bad shape {s:?} for {heads} heads"
    );
    let (b, t, d) = (s[0], s[1], s[2] / heads);
    swap12_var(tape, v, [b, t, heads, d])
}

/// [B, H, T, D] -> [B, T, H*D].
pub fn merge_heads(tape: &mut Tape, v: &Var) -> Result<Var> {
    let s = v.shape().to_vec();
    ensure!(s.len() == 4, "merge_heads: bad shape {s:?}");
    let out = swap12_var(tape, v, [s[0], s[1], s[2], s[3]])?;
    let t = out.tensor().reshape(&[s[0], s[2], s[1] * s[3]])?;
    Ok(reshape_var(tape, &out, t))
}

/// View a Var under a new shape (gradient reshaped back).
pub fn reshape_var(tape: &mut Tape, v: &Var, t: Tensor) -> Var {
    let shape = v.shape().to_vec();
    tape.record(
        t,
        &[v],
        Box::new(move |dy, _| Ok(vec![Some(dy.reshape(&shape)?)])),
    )
}

pub fn swap12_ref(x: &[f64], dims: [usize; 4]) -> Vec<f64> {
    let [na, nx, ny, nz] = dims;
    let mut out = vec![0.0; x.len()];
    for a in 0..na {
        for i in 0..nx {
            for j in 0..ny {
                for k in 0..nz {
                    out[((a * ny + j) * nx + i) * nz + k] = x[((a * nx + i) * ny + j) * nz + k];
                }
            }
        }
    }
    out
}

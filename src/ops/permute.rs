//! Axis swaps: batched transpose and attention head split/merge.

use super::{shader, u};
use crate::gpu::Shader;
use crate::tape::{Tape, Var};
use crate::tensor::Tensor;
use anyhow::{ensure, Result};

const SHADER: Shader = shader!("permute");
const SHADER_VEC4: Shader = shader!("permute_vec4");

/// [a, x, y, z] -> [a, y, x, z].
pub fn swap12(t: &Tensor, dims: [usize; 4]) -> Result<Tensor> {
    swap12_pad(t, dims, dims[1], dims[2])
}

/// [a, x, y, z] -> [a, y_out, x_out, z]: `swap12`, then the swapped axes
/// zero-padded (or cropped) to `x_out` and `y_out`.
pub fn swap12_pad(t: &Tensor, dims: [usize; 4], x_out: usize, y_out: usize) -> Result<Tensor> {
    let [na, nx, ny, nz] = dims;
    ensure!(
        na * nx * ny * nz == t.numel(),
        "swap12: dims {dims:?} do not match {:?}",
        t.shape()
    );
    let gpu = t.gpu();
    let out = Tensor::empty(gpu, &[na, y_out, x_out, nz])?;
    // Whole vec4s where the inner axis allows: a quarter of the loads.
    let (shader, entry, w) = if nz.is_multiple_of(4) {
        (&SHADER_VEC4, "swap12_vec4", 4)
    } else {
        (&SHADER, "swap12", 1)
    };
    gpu.dispatch(
        shader,
        entry,
        &[u(na), u(nx), u(ny), u(nz / w), u(x_out), u(y_out)],
        &[Some(t.buffer()), Some(out.buffer())],
        gpu.grid_1d(out.numel() / w, 256),
    )?;
    Ok(out)
}

/// [batch, rows, cols] -> [batch, cols, rows].
pub fn transpose(t: &Tensor, batch: usize, rows: usize, cols: usize) -> Result<Tensor> {
    if !(rows.is_multiple_of(4) && cols.is_multiple_of(4)) {
        return swap12(t, [batch, rows, cols, 1])?.reshape(&[batch, cols, rows]);
    }
    ensure!(
        batch * rows * cols == t.numel(),
        "transpose: {batch}x{rows}x{cols} does not match {:?}",
        t.shape()
    );
    // 4x4 blocks, whole vec4s in and out.
    let gpu = t.gpu();
    let out = Tensor::empty(gpu, &[batch, cols, rows])?;
    gpu.dispatch(
        &SHADER_VEC4,
        "transpose4",
        &[u(batch), u(rows), u(cols), 1, 0, 0],
        &[Some(t.buffer()), Some(out.buffer())],
        gpu.grid_1d(batch * rows * cols / 16, 256),
    )?;
    Ok(out)
}

/// [B, T, H*D] -> [B, H, Tp, D] with zero rows past T (Tp >= T).
pub fn split_heads_pad(tape: &mut Tape, v: &Var, heads: usize, tp: usize) -> Result<Var> {
    let s = v.shape();
    ensure!(
        s.len() == 3 && heads > 0 && s[2].is_multiple_of(heads) && tp >= s[1],
        "split_heads: bad shape {s:?} for {heads} heads padded to {tp}"
    );
    let (b, t, d) = (s[0], s[1], s[2] / heads);
    let out = swap12_pad(v.tensor(), [b, t, heads, d], tp, heads)?;
    let shape = s.to_vec();
    Ok(tape.record(
        out,
        &[v],
        Box::new(move |dy, _| {
            Ok(vec![Some(
                swap12_pad(dy, [b, heads, tp, d], heads, t)?.reshape(&shape)?,
            )])
        }),
    ))
}

/// [B, H, Tp, D] -> [B, T, H*D], dropping rows past T (T <= Tp).
pub fn merge_heads_crop(tape: &mut Tape, v: &Var, t: usize) -> Result<Var> {
    let s = v.shape().to_vec();
    ensure!(
        s.len() == 4 && t <= s[2],
        "merge_heads: bad shape {s:?} cropped to {t} rows"
    );
    let (b, h, tp, d) = (s[0], s[1], s[2], s[3]);
    let out = swap12_pad(v.tensor(), [b, h, tp, d], h, t)?.reshape(&[b, t, h * d])?;
    Ok(tape.record(
        out,
        &[v],
        Box::new(move |dy, _| {
            Ok(vec![Some(
                swap12_pad(dy, [b, t, h, d], tp, h)?.reshape(&[b, h, tp, d])?,
            )])
        }),
    ))
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

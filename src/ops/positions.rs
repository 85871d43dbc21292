//! Each column's own row's position in that column's ranking
//! (shaders/positions.wgsl): what retrieval recall@K reads (a hit at K is a
//! position below K), without finding the K best. The order is
//! [`super::topk`]'s: higher score first, equal scores by lower row.

use super::{shader, u};
use crate::gpu::Shader;
use crate::tensor::Tensor;
use anyhow::{ensure, Result};

const SHADER: Shader = shader!("positions");

/// For each of the first `cols` columns c of `scores` ([.., stride] with
/// `stride % 4 == 0`, the first `rows` rows counting), how many rows rank
/// before row `own[c]` (u32 bits of an f32 tensor, as [`super::topk`]'s
/// indices): [cols] u32 bits. Scores must be finite.
pub fn column_positions(
    scores: &Tensor,
    rows: usize,
    cols: usize,
    stride: usize,
    own: &Tensor,
) -> Result<Tensor> {
    ensure!(
        stride.is_multiple_of(4) && cols <= stride,
        "positions: {cols} columns in rows of {stride} (a multiple of 4 at least as long)"
    );
    ensure!(
        scores.numel() >= rows * stride && own.numel() >= cols,
        "positions: {rows} x {stride} scores and {cols} own rows, given {:?} and {:?}",
        scores.shape(),
        own.shape()
    );
    let gpu = scores.gpu();
    let out = Tensor::empty(gpu, &[cols.max(1)])?;
    if rows == 0 || cols == 0 {
        return Ok(out);
    }
    gpu.dispatch(
        &SHADER,
        "positions",
        &[u(rows), u(cols), u(stride / 4), 0],
        &[
            Some(scores.buffer()),
            Some(own.buffer()),
            Some(out.buffer()),
        ],
        gpu.grid_1d(cols.div_ceil(4), 64),
    )?;
    Ok(out)
}

/// CPU reference of [`column_positions`] on a host [rows, stride] matrix.
pub fn column_positions_ref(
    scores: &[f32],
    rows: usize,
    cols: usize,
    stride: usize,
    own: &[u32],
) -> Vec<u32> {
    (0..cols)
        .map(|c| {
            let o = own[c] as usize;
            let t = scores[o * stride + c];
            (0..rows)
                .filter(|&r| {
                    let v = scores[r * stride + c];
                    v > t || (v == t && r < o)
                })
                .count() as u32
        })
        .collect()
}

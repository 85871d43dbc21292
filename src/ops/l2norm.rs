//! L2 normalisation of each row of the last dimension (the CLIP embedding
//! heads), without an epsilon as in transformers: a zero row gives NaN there
//! too. The forward keeps each row's norm for the backward.

use super::layernorm::Rows;
use super::{shader, u};
use crate::gpu::Shader;
use crate::tape::{Tape, Var};
use crate::tensor::Tensor;
use anyhow::{ensure, Result};

const SHADER: Shader = shader!("l2norm");

/// (y = x / ||x||, norm [rows]).
pub fn forward(x: &Tensor) -> Result<(Tensor, Tensor)> {
    forward_with(x, None)
}

/// `forward` with a forced row layout (tests, bench).
pub fn forward_with(x: &Tensor, layout: Option<Rows>) -> Result<(Tensor, Tensor)> {
    ensure!(
        !x.shape().is_empty() && x.cols() > 0,
        "l2_normalize: input {:?} has no last dimension",
        x.shape()
    );
    let gpu = x.gpu();
    let (rows, cols) = (x.rows(), x.cols());
    let y = Tensor::empty(gpu, x.shape())?;
    let norm = Tensor::empty(gpu, &[rows])?;
    let (entry, groups) = Rows::pick(gpu, layout).launch(gpu, "forward", rows);
    gpu.dispatch(
        &SHADER,
        &entry,
        &[u(rows), u(cols), 0, 0],
        &[Some(x.buffer()), Some(y.buffer()), Some(norm.buffer())],
        groups,
    )?;
    Ok((y, norm))
}

/// dx = (dy - y (y . dy)) / ||x|| from the saved y and norm.
pub fn backward(dy: &Tensor, y: &Tensor, norm: &Tensor) -> Result<Tensor> {
    backward_with(dy, y, norm, None)
}

pub fn backward_with(
    dy: &Tensor,
    y: &Tensor,
    norm: &Tensor,
    layout: Option<Rows>,
) -> Result<Tensor> {
    ensure!(
        dy.shape() == y.shape(),
        "l2_normalize backward: dy {:?} does not match y {:?}",
        dy.shape(),
        y.shape()
    );
    let gpu = y.gpu();
    let (rows, cols) = (y.rows(), y.cols());
    ensure!(
        norm.numel() == rows,
        "l2_normalize backward: norm {:?} is not [{rows}]",
        norm.shape()
    );
    let dx = Tensor::empty(gpu, y.shape())?;
    let (entry, groups) = Rows::pick(gpu, layout).launch(gpu, "backward", rows);
    gpu.dispatch(
        &SHADER,
        &entry,
        &[u(rows), u(cols), 0, 0],
        &[
            Some(dy.buffer()),
            Some(dx.buffer()),
            Some(norm.buffer()),
            Some(y.buffer()),
        ],
        groups,
    )?;
    Ok(dx)
}

/// Tape op: x / ||x||_2 over the last dimension.
pub fn l2_normalize(tape: &mut Tape, x: &Var) -> Result<Var> {
    let (y, norm) = forward(x.tensor())?;
    let ys = y.clone();
    Ok(tape.record(
        y,
        &[x],
        Box::new(move |dy, _| Ok(vec![Some(backward(dy, &ys, &norm)?)])),
    ))
}

pub fn l2_normalize_ref(x: &[f64], cols: usize) -> Vec<f64> {
    x.chunks(cols)
        .flat_map(|row| {
            let n = row.iter().map(|v| v * v).sum::<f64>().sqrt();
            row.iter().map(move |v| v / n)
        })
        .collect()
}

/// dx from the input x and dy.
pub fn l2_normalize_backward_ref(x: &[f64], dy: &[f64], cols: usize) -> Vec<f64> {
    let mut out = Vec::with_capacity(x.len());
    for (row, drow) in x.chunks(cols).zip(dy.chunks(cols)) {
        let n = row.iter().map(|v| v * v).sum::<f64>().sqrt();
        let d: f64 = row.iter().zip(drow).map(|(a, b)| a * b).sum::<f64>() / n;
        for (v, g) in row.iter().zip(drow) {
            out.push((g - v / n * d) / n);
        }
    }
    out
}

//! Masked row softmax of attention scores [B, H, Tq, Tk]: causal mask (CLIP
//! text), key-padding mask (padded text batches), or none (vision). The
//! backward needs only the probabilities.

use super::layernorm::Rows;
use super::{shader, u};
use crate::gpu::Shader;
use crate::tape::{Tape, Var};
use crate::tensor::Tensor;
use anyhow::{ensure, Result};

const SHADER: Shader = shader!("softmax");

/// Which keys a query may attend to.
#[derive(Clone, Debug, Default)]
pub struct Mask {
    /// Mask key j for query i when j > i.
    pub causal: bool,
    /// [B, Tk]: 1.0 keeps a key, 0.0 masks it (padding).
    pub key_valid: Option<Tensor>,
    /// Mask keys j >= this (zero padding of the sequence).
    pub keys: Option<usize>,
}

impl Mask {
    /// Every key visible.
    pub fn none() -> Mask {
        Mask::default()
    }
}

fn dims(scores: &Tensor) -> Result<[usize; 4]> {
    let s = scores.shape();
    ensure!(
        s.len() == 4,
        "softmax: scores must be [B, H, Tq, Tk], got {s:?}"
    );
    Ok([s[0], s[1], s[2], s[3]])
}

/// P = softmax over the last axis of the masked scores.
pub fn forward(scores: &Tensor, mask: &Mask) -> Result<Tensor> {
    forward_with(scores, mask, None)
}

/// `forward` with a forced row layout (tests, bench).
pub fn forward_with(scores: &Tensor, mask: &Mask, layout: Option<Rows>) -> Result<Tensor> {
    let [b, h, tq, tk] = dims(scores)?;
    if let Some(kv) = &mask.key_valid {
        ensure!(
            kv.numel() == b * tk,
            "softmax: key_valid {:?} is not [{b}, {tk}] for scores {:?}",
            kv.shape(),
            scores.shape()
        );
    }
    let gpu = scores.gpu();
    let rows = b * h * tq;
    let out = Tensor::empty(gpu, scores.shape())?;
    let (entry, groups) = Rows::pick(gpu, layout).launch(gpu, "forward", rows);
    gpu.dispatch(
        &SHADER,
        &entry,
        &[
            u(rows),
            u(tk),
            u(tq),
            u(h),
            mask.causal as u32,
            mask.key_valid.is_some() as u32,
            mask.keys.map_or(0, u),
            0,
        ],
        &[
            Some(scores.buffer()),
            Some(out.buffer()),
            mask.key_valid.as_ref().map(|t| t.buffer()),
        ],
        groups,
    )?;
    Ok(out)
}

/// dS = P * (dP - sum_j dP * P) per row.
pub fn backward(p: &Tensor, dp: &Tensor) -> Result<Tensor> {
    backward_with(p, dp, None)
}

pub fn backward_with(p: &Tensor, dp: &Tensor, layout: Option<Rows>) -> Result<Tensor> {
    ensure!(
        p.shape() == dp.shape(),
        "softmax backward: dP {:?} does not match P {:?}",
        dp.shape(),
        p.shape()
    );
    let gpu = p.gpu();
    let (rows, cols) = (p.rows(), p.cols());
    let ds = Tensor::empty(gpu, p.shape())?;
    let (entry, groups) = Rows::pick(gpu, layout).launch(gpu, "backward", rows);
    gpu.dispatch(
        &SHADER,
        &entry,
        &[u(rows), u(cols), 1, 1, 0, 0, 0, 0],
        &[Some(dp.buffer()), Some(ds.buffer()), Some(p.buffer())],
        groups,
    )?;
    Ok(ds)
}

/// Tape op: masked softmax of scores [B, H, Tq, Tk]; saves P.
pub fn masked_softmax(tape: &mut Tape, scores: &Var, mask: &Mask) -> Result<Var> {
    let p = forward(scores.tensor(), mask)?;
    let saved = p.clone();
    Ok(tape.record(
        p,
        &[scores],
        Box::new(move |dp, _| Ok(vec![Some(backward(&saved, dp)?)])),
    ))
}

/// f64 reference; `key_valid` is [b, tk].
pub fn softmax_ref(
    x: &[f64],
    b: usize,
    h: usize,
    tq: usize,
    tk: usize,
    causal: bool,
    key_valid: Option<&[f64]>,
) -> Vec<f64> {
    let mut out = vec![0.0; x.len()];
    for row in 0..b * h * tq {
        let (i, bi) = (row % tq, row / (h * tq));
        let keep =
            |j: usize| (!causal || j <= i) && key_valid.is_none_or(|kv| kv[bi * tk + j] != 0.0);
        let xs = &x[row * tk..(row + 1) * tk];
        let m = (0..tk)
            .filter(|&j| keep(j))
            .map(|j| xs[j])
            .fold(f64::NEG_INFINITY, f64::max);
        let s: f64 = (0..tk)
            .filter(|&j| keep(j))
            .map(|j| (xs[j] - m).exp())
            .sum();
        for j in (0..tk).filter(|&j| keep(j)) {
            out[row * tk + j] = (xs[j] - m).exp() / s;
        }
    }
    out
}

pub fn softmax_backward_ref(p: &[f64], dp: &[f64], rows: usize, cols: usize) -> Vec<f64> {
    let mut out = vec![0.0; rows * cols];
    for r in 0..rows {
        let ps = &p[r * cols..(r + 1) * cols];
        let ds = &dp[r * cols..(r + 1) * cols];
        let d: f64 = ps.iter().zip(ds).map(|(a, b)| a * b).sum();
        for c in 0..cols {
            out[r * cols + c] = ps[c] * (ds[c] - d);
        }
    }
    out
}

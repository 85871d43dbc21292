//! OpenCLIP's `local_loss` across data-parallel ranks: each rank scores only
//! its own n rows against all N gathered columns, instead of every rank
//! computing the whole N x N loss. One half is [`row_ce`]: rows `a` [n, E]
//! (this rank's image or text embeddings) against `b` [N, E] (every rank's
//! other side), row k's label being column `off + k`, summed and divided by
//! `denom`. A rank's local loss is `row_ce(I_r, T) + row_ce(T_r, I)` with
//! `denom` = 2N; summed over ranks it is the contrastive loss over all N
//! pairs, and the gradients that reach the gathered columns, summed over
//! ranks (what OpenCLIP's gather with gradient does), complete each rank's
//! rows' gradient (tests/loss.rs checks both against ops::loss). Memory
//! and work are n x N per rank; the logits are made a block of rows at a
//! time, as in ops::loss_blocked.

use super::matmul::{gemm, gemm_into, Gemm};
use super::{f, reduce, shader, u};
use crate::gpu::Shader;
use crate::tape::{Tape, Var};
use crate::tensor::Tensor;
use anyhow::{ensure, Result};

const SHADER: Shader = shader!("loss_local");

struct Dims {
    /// Rows of a, columns (rows of b), width.
    rows: usize,
    n: usize,
    e: usize,
}

fn dims(a: &Tensor, b: &Tensor, s: &Tensor, off: usize) -> Result<Dims> {
    let (as_, bs) = (a.shape(), b.shape());
    ensure!(
        as_.len() == 2 && bs.len() == 2 && as_[1] == bs[1],
        "local loss: rows {as_:?} and columns {bs:?} must be [n, E] and [N, E]"
    );
    ensure!(as_[0] > 0, "local loss: no rows");
    ensure!(
        off + as_[0] <= bs[0],
        "local loss: rows {off}..{} are not among the {} columns",
        off + as_[0],
        bs[0]
    );
    ensure!(
        s.numel() == 1,
        "local loss: logit_scale {:?} is not a scalar",
        s.shape()
    );
    Ok(Dims {
        rows: as_[0],
        n: bs[0],
        e: as_[1],
    })
}

/// Rows per block: at most 1024, and few enough that a block of logits
/// fits one storage binding.
fn block_rows(gpu: &crate::Gpu, n: usize) -> usize {
    super::loss_blocked::block_rows(gpu, n)
}

fn params(d: &Dims, r0: usize, rows: usize, blk: usize, off: usize, denom: f32) -> [u32; 8] {
    [
        u(d.n),
        u(r0),
        u(rows),
        u(blk),
        u(off),
        u(d.rows),
        f(denom),
        0,
    ]
}

/// Forward: (loss [1], stats [2n + 1]: each row's log-sum-exp and labelled
/// logit, then the loss).
pub fn forward(
    a: &Tensor,
    b: &Tensor,
    s: &Tensor,
    off: usize,
    denom: f32,
) -> Result<(Tensor, Tensor)> {
    let d = dims(a, b, s, off)?;
    let gpu = a.gpu();
    let rows = block_rows(gpu, d.n);
    let stats = Tensor::empty(gpu, &[2 * d.rows + 1])?;
    for blk in 0..d.rows.div_ceil(rows) {
        let r0 = blk * rows;
        let r = rows.min(d.rows - r0);
        let ab = a.rows_copy(r0, r)?;
        let zb = gemm(&ab, b, None, Gemm::new(1, r, d.n, d.e).tb(true))?;
        gpu.dispatch(
            &SHADER,
            "row_lse",
            &params(&d, r0, r, blk, off, denom),
            &[Some(stats.buffer()), Some(zb.buffer()), Some(s.buffer())],
            [u(r.div_ceil(64)), 1, 1],
        )?;
    }
    gpu.dispatch(
        &SHADER,
        "finish",
        &params(&d, 0, 0, 0, off, denom),
        &[Some(stats.buffer())],
        [1, 1, 1],
    )?;
    let loss = Tensor::empty(gpu, &[1])?;
    gpu.copy_range(stats.buffer(), (2 * d.rows * 4) as u64, loss.buffer(), 4);
    Ok((loss, stats))
}

/// Backward from `dy` [1]: (d a, d b, d s) where `needs` asks for them.
#[allow(clippy::type_complexity, clippy::too_many_arguments)]
pub fn backward(
    dy: &Tensor,
    a: &Tensor,
    b: &Tensor,
    s: &Tensor,
    stats: &Tensor,
    off: usize,
    denom: f32,
    needs: [bool; 3],
) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
    let d = dims(a, b, s, off)?;
    let gpu = a.gpu();
    let rows = block_rows(gpu, d.n);
    let blocks = d.rows.div_ceil(rows);
    let part = Tensor::empty(gpu, &[blocks, d.n])?;
    let da = if needs[0] {
        Some(Tensor::empty(gpu, &[d.rows, d.e])?)
    } else {
        None
    };
    let db = if needs[1] {
        Some(Tensor::empty(gpu, &[d.n, d.e])?)
    } else {
        None
    };
    for blk in 0..blocks {
        let r0 = blk * rows;
        let r = rows.min(d.rows - r0);
        let ab = a.rows_copy(r0, r)?;
        let zb = gemm(&ab, b, None, Gemm::new(1, r, d.n, d.e).tb(true))?;
        let dm = Tensor::empty(gpu, &[r, d.n])?;
        gpu.dispatch(
            &SHADER,
            "row_dlogits",
            &params(&d, r0, r, blk, off, denom),
            &[
                Some(stats.buffer()),
                Some(zb.buffer()),
                Some(s.buffer()),
                Some(part.buffer()),
                Some(dy.buffer()),
                Some(dm.buffer()),
            ],
            [u(d.n.div_ceil(64)), 1, 1],
        )?;
        drop(zb);
        if let Some(da) = &da {
            // dA rows of the block = dM_b B.
            let g = gemm(&dm, b, None, Gemm::new(1, r, d.e, d.n))?;
            da.write_rows(r0, &g.reshape(&[r, d.e])?)?;
        }
        if let Some(db) = &db {
            // dB += dM_b^T A_b.
            let mut g = Gemm::new(1, d.n, d.e, r).ta(true);
            g.accumulate = blk > 0;
            gemm_into(db, &dm, &ab, None, g)?;
        }
    }
    let ds = if needs[2] {
        Some(reduce::colsum(&part, blocks * d.n, 1)?.reshape(s.shape())?)
    } else {
        None
    };
    Ok((da, db, ds))
}

/// Tape op: [`row_ce`]'s value, differentiable in `a`, `b` and the
/// log-space `logit_scale`.
pub fn row_ce(
    tape: &mut Tape,
    a: &Var,
    b: &Var,
    logit_scale: &Var,
    off: usize,
    denom: f32,
) -> Result<Var> {
    let (at, bt, st) = (a.tensor(), b.tensor(), logit_scale.tensor());
    let (loss, stats) = forward(at, bt, st, off, denom)?;
    let (at, bt, st) = (at.clone(), bt.clone(), st.clone());
    Ok(tape.record(
        loss,
        &[a, b, logit_scale],
        Box::new(move |dy, needs| {
            let (da, db, ds) = backward(
                dy,
                &at,
                &bt,
                &st,
                &stats,
                off,
                denom,
                [needs[0], needs[1], needs[2]],
            )?;
            Ok(vec![da, db, ds])
        }),
    ))
}

/// CPU reference (f64): sum over rows k of a of
/// `lse_j(e^s a_k . b_j) - e^s a_k . b_(off+k)`, divided by `denom`.
pub fn row_ce_ref(a: &[f64], b: &[f64], s: f64, e: usize, off: usize, denom: f64) -> f64 {
    let (rows, n) = (a.len() / e, b.len() / e);
    let sc = s.exp();
    let mut total = 0.0;
    for k in 0..rows {
        let z: Vec<f64> = (0..n)
            .map(|j| sc * (0..e).map(|c| a[k * e + c] * b[j * e + c]).sum::<f64>())
            .collect();
        let m = z.iter().cloned().fold(f64::MIN, f64::max);
        let lse = m + z.iter().map(|v| (v - m).exp()).sum::<f64>().ln();
        total += lse - z[off + k];
    }
    total / denom
}

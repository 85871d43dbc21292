//! CLIP's contrastive loss for batches whose N x N logits are too large to
//! hold: the full-batch loss of gradient accumulation, over thousands to
//! tens of thousands of pairs (the original CLIP's batch was 32,768; its
//! logits alone would take 4 GiB, and one storage binding is often limited
//! to 128 MiB). The logits are made a block of text rows at a time, in the
//! forward and again in the backward, so memory grows as N x block rows
//! instead of N x N, for one more T I^T matmul. The same loss and gradients
//! as ops::loss (tests/loss.rs compares them); the CPU reference is
//! loss.rs's.

use super::matmul::{gemm, gemm_into, Gemm};
use super::{reduce, shader, u};
use crate::gpu::Shader;
use crate::tape::{Tape, Var};
use crate::tensor::Tensor;
use anyhow::{ensure, Result};

const SHADER: Shader = shader!("loss_blocked");

/// Text rows per block: at most 1024, and few enough that a block of
/// logits fits one storage binding of the adapter.
pub fn block_rows(gpu: &crate::Gpu, n: usize) -> usize {
    let limit = gpu.limits.max_storage_buffer_binding_size as usize / 4;
    (limit / n.max(1)).clamp(1, 1024)
}

fn dims(i: &Tensor, t: &Tensor, s: &Tensor, rows: usize) -> Result<(usize, usize)> {
    ensure!(rows > 0, "clip_loss: blocks need at least one row");
    super::loss::dims(i, t, s)
}

/// Block `b` of `rows` text rows: (first row, rows, T_b, T_b I^T [rows, N]).
fn block(i: &Tensor, t: &Tensor, b: usize, rows: usize) -> Result<(usize, usize, Tensor, Tensor)> {
    let (n, e) = (t.rows(), t.cols());
    let r0 = b * rows;
    let r = rows.min(n - r0);
    let tb = t.rows_copy(r0, r)?;
    let zb = gemm(&tb, i, None, Gemm::new(1, r, n, e).tb(true))?;
    Ok((r0, r, tb, zb))
}

/// Forward with blocks of `rows` text rows: (loss [1], stats [3N + 1]:
/// row and column log-sum-exps, the diagonal, then the loss).
pub fn forward(i: &Tensor, t: &Tensor, s: &Tensor, rows: usize) -> Result<(Tensor, Tensor)> {
    let (n, _) = dims(i, t, s, rows)?;
    let gpu = i.gpu();
    let blocks = n.div_ceil(rows);
    let stats = Tensor::empty(gpu, &[3 * n + 1])?;
    let cols = Tensor::empty(gpu, &[blocks, n])?;
    for b in 0..blocks {
        let (r0, r, _, zb) = block(i, t, b, rows)?;
        gpu.dispatch(
            &SHADER,
            "block_lse",
            &[u(n), u(r0), u(r), u(b)],
            &[
                Some(stats.buffer()),
                Some(cols.buffer()),
                Some(s.buffer()),
                Some(zb.buffer()),
            ],
            gpu.grid_1d(r + n, 256),
        )?;
    }
    let params = [u(n), 0, 0, u(blocks)];
    gpu.dispatch(
        &SHADER,
        "finish_cols",
        &params,
        &[Some(stats.buffer()), Some(cols.buffer())],
        gpu.grid_1d(n, 256),
    )?;
    gpu.dispatch(
        &SHADER,
        "finish_loss",
        &params,
        &[Some(stats.buffer())],
        [1, 1, 1],
    )?;
    let loss = Tensor::empty(gpu, &[1])?;
    gpu.copy_range(stats.buffer(), (3 * n * 4) as u64, loss.buffer(), 4);
    Ok((loss, stats))
}

/// Backward from the upstream gradient `dy` [1]: (dI, dT, ds) where `needs`
/// (image, text, scale) asks for them.
#[allow(clippy::type_complexity)]
pub fn backward(
    dy: &Tensor,
    i: &Tensor,
    t: &Tensor,
    s: &Tensor,
    stats: &Tensor,
    rows: usize,
    needs: [bool; 3],
) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
    let (n, e) = dims(i, t, s, rows)?;
    let gpu = i.gpu();
    let blocks = n.div_ceil(rows);
    let part = Tensor::empty(gpu, &[blocks, n])?;
    let di = if needs[0] {
        Some(Tensor::empty(gpu, &[n, e])?)
    } else {
        None
    };
    let dt = if needs[1] {
        Some(Tensor::empty(gpu, &[n, e])?)
    } else {
        None
    };
    for b in 0..blocks {
        let (r0, r, tb, zb) = block(i, t, b, rows)?;
        let dm = Tensor::empty(gpu, &[r, n])?;
        gpu.dispatch(
            &SHADER,
            "block_dlogits",
            &[u(n), u(r0), u(r), u(b)],
            &[
                Some(stats.buffer()),
                Some(part.buffer()),
                Some(s.buffer()),
                Some(zb.buffer()),
                Some(dy.buffer()),
                Some(dm.buffer()),
            ],
            [u(n.div_ceil(64)), 1, 1],
        )?;
        drop(zb);
        if let Some(dt) = &dt {
            // dT rows of the block = dM_b I.
            let d = gemm(&dm, i, None, Gemm::new(1, r, e, n))?;
            dt.write_rows(r0, &d.reshape(&[r, e])?)?;
        }
        if let Some(di) = &di {
            // dI += dM_b^T T_b.
            let mut g = Gemm::new(1, n, e, r).ta(true);
            g.accumulate = b > 0;
            gemm_into(di, &dm, &tb, None, g)?;
        }
    }
    let ds = if needs[2] {
        Some(reduce::colsum(&part, blocks * n, 1)?.reshape(s.shape())?)
    } else {
        None
    };
    Ok((di, dt, ds))
}

/// Tape op: the contrastive loss of L2-normalised image_embeds and
/// text_embeds [N, E] and the log-space logit_scale [1], in blocks of `rows`
/// text rows (no logits are returned: they are never whole).
pub fn clip_loss_blocked(
    tape: &mut Tape,
    image_embeds: &Var,
    text_embeds: &Var,
    logit_scale: &Var,
    rows: usize,
) -> Result<Var> {
    let (i, t, s) = (
        image_embeds.tensor(),
        text_embeds.tensor(),
        logit_scale.tensor(),
    );
    let (loss, stats) = forward(i, t, s, rows)?;
    let (i, t, s) = (i.clone(), t.clone(), s.clone());
    Ok(tape.record(
        loss,
        &[image_embeds, text_embeds, logit_scale],
        Box::new(move |dy, needs| {
            let (di, dt, ds) =
                backward(dy, &i, &t, &s, &stats, rows, [needs[0], needs[1], needs[2]])?;
            Ok(vec![di, dt, ds])
        }),
    ))
}

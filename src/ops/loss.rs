//! CLIP's contrastive loss, as transformers computes it:
//! logits_per_text = exp(s) T I^T, logits_per_image its transpose, loss =
//! mean of the two cross entropies against the diagonal. Both matmuls (and
//! those of the backward) go through ops::matmul; the log-sum-exps, the loss
//! scalar and the logits gradient are WGSL kernels that read the logit scale
//! and upstream gradient from GPU buffers, so nothing is read back.

use super::matmul::{gemm, gemm_backward, Gemm};
use super::{permute, reduce, shader, u};
use crate::gpu::Shader;
use crate::tape::{Tape, Var};
use crate::tensor::Tensor;
use anyhow::{ensure, Result};

const SHADER: Shader = shader!("loss");
/// Rows of the logits one backward thread walks (per column).
const CHUNK: usize = 64;

/// The loss and the logits it came from.
pub struct ClipLoss {
    pub loss: Var,
    /// exp(s) T I^T, [N, N]: row i scores text i against every image.
    pub logits_per_text: Tensor,
}

impl ClipLoss {
    /// logits_per_image = logits_per_text^T.
    pub fn logits_per_image(&self) -> Result<Tensor> {
        logits_per_image(&self.logits_per_text)
    }
}

/// logits_per_image from logits_per_text ([N, N] transpose).
pub fn logits_per_image(logits_per_text: &Tensor) -> Result<Tensor> {
    let n = logits_per_text.cols();
    ensure!(
        logits_per_text.numel() == n * n,
        "logits_per_image: {:?} is not square",
        logits_per_text.shape()
    );
    permute::transpose(logits_per_text, 1, n, n)?.reshape(&[n, n])
}

/// (N, E) of image and text embeddings [N, E] and a scalar logit scale.
pub(crate) fn dims(i: &Tensor, t: &Tensor, s: &Tensor) -> Result<(usize, usize)> {
    let (is, ts) = (i.shape(), t.shape());
    ensure!(
        is.len() == 2 && is == ts,
        "clip_loss: image embeds {is:?} and text embeds {ts:?} must both be [N, E]"
    );
    ensure!(is[0] > 0, "clip_loss: empty batch");
    ensure!(
        s.numel() == 1,
        "clip_loss: logit_scale {:?} is not a scalar",
        s.shape()
    );
    Ok((is[0], is[1]))
}

fn gemm_dims(n: usize, e: usize) -> Gemm {
    // Z0 = T I^T: A = T [N, E], B = I stored [N, E] (transposed).
    Gemm::new(1, n, n, e).tb(true)
}

/// Forward: (loss [1], logits_per_text [N, N], stats [2N + 1]: row and
/// column log-sum-exps, then the loss) — the backward needs the logits and stats.
pub fn clip_loss_forward(i: &Tensor, t: &Tensor, s: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
    let (n, e) = dims(i, t, s)?;
    let gpu = i.gpu();
    let z = gemm(t, i, None, gemm_dims(n, e))?.reshape(&[n, n])?;
    let stats = Tensor::empty(gpu, &[2 * n + 1])?;
    let params = [u(n), 0, 0, 0];
    let b3 = [Some(s.buffer()), Some(z.buffer()), Some(stats.buffer())];
    gpu.dispatch(&SHADER, "lse", &params, &b3, gpu.grid_1d(2 * n, 256))?;
    gpu.dispatch(&SHADER, "loss", &params, &b3, [1, 1, 1])?;
    gpu.dispatch(
        &SHADER,
        "scale_logits",
        &params,
        &b3[..2],
        gpu.grid_1d(n * n, 256),
    )?;
    let loss = Tensor::empty(gpu, &[1])?;
    gpu.copy_range(stats.buffer(), (2 * n * 4) as u64, loss.buffer(), 4);
    Ok((loss, z, stats))
}

/// Backward from the upstream gradient `dy` [1]: (dI, dT, ds) where `needs`
/// (image, text, scale) asks for them.
#[allow(clippy::type_complexity)]
pub fn clip_loss_backward(
    dy: &Tensor,
    i: &Tensor,
    t: &Tensor,
    s: &Tensor,
    logits: &Tensor,
    stats: &Tensor,
    needs: [bool; 3],
) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
    let (n, e) = dims(i, t, s)?;
    ensure!(
        dy.numel() == 1,
        "clip_loss backward: dy {:?} is not a scalar",
        dy.shape()
    );
    let gpu = i.gpu();
    let chunks = n.div_ceil(CHUNK);
    let dm = Tensor::empty(gpu, &[n, n])?;
    let part = Tensor::empty(gpu, &[chunks, n])?;
    gpu.dispatch(
        &SHADER,
        "dlogits",
        &[u(n), u(CHUNK), 0, 0],
        &[
            Some(s.buffer()),
            Some(logits.buffer()),
            Some(stats.buffer()),
            Some(dy.buffer()),
            Some(dm.buffer()),
            Some(part.buffer()),
        ],
        [u(n.div_ceil(64)), u(chunks), 1],
    )?;
    let ds = if needs[2] {
        Some(reduce::colsum(&part, chunks * n, 1)?.reshape(s.shape())?)
    } else {
        None
    };
    let (dt, di) = gemm_backward(&dm, t, i, gemm_dims(n, e), needs[1], needs[0])?;
    Ok((di, dt, ds))
}

/// Tape op: CLIP's contrastive loss from L2-normalised image_embeds and
/// text_embeds [N, E] and the log-space logit_scale [1].
pub fn clip_loss(
    tape: &mut Tape,
    image_embeds: &Var,
    text_embeds: &Var,
    logit_scale: &Var,
) -> Result<ClipLoss> {
    let (i, t, s) = (
        image_embeds.tensor(),
        text_embeds.tensor(),
        logit_scale.tensor(),
    );
    let (loss, logits, stats) = clip_loss_forward(i, t, s)?;
    let (i, t, s, z) = (i.clone(), t.clone(), s.clone(), logits.clone());
    let loss = tape.record(
        loss,
        &[image_embeds, text_embeds, logit_scale],
        Box::new(move |dy, needs| {
            let (di, dt, ds) =
                clip_loss_backward(dy, &i, &t, &s, &z, &stats, [needs[0], needs[1], needs[2]])?;
            Ok(vec![di, dt, ds])
        }),
    );
    Ok(ClipLoss {
        loss,
        logits_per_text: logits,
    })
}

/// Batches above this many pairs take the blocked loss (ops::loss_blocked)
/// in [`contrastive_loss`].
pub const BLOCKED_ABOVE: usize = 1024;

/// The loss alone (no logits), for a batch of any size: whole logits up to
/// [`BLOCKED_ABOVE`] pairs, blocks of text rows above (the same loss and
/// gradients; memory N x 1024 instead of N x N).
pub fn contrastive_loss(
    tape: &mut Tape,
    image_embeds: &Var,
    text_embeds: &Var,
    logit_scale: &Var,
) -> Result<Var> {
    let n = image_embeds.shape().first().copied().unwrap_or(0);
    if n > BLOCKED_ABOVE {
        let rows = super::loss_blocked::block_rows(image_embeds.tensor().gpu(), n);
        super::loss_blocked::clip_loss_blocked(tape, image_embeds, text_embeds, logit_scale, rows)
    } else {
        Ok(clip_loss(tape, image_embeds, text_embeds, logit_scale)?.loss)
    }
}

/// CPU reference: logits_per_text = exp(s) T I^T, [n, n].
pub fn clip_logits_ref(i: &[f64], t: &[f64], s: f64, n: usize, e: usize) -> Vec<f64> {
    let sc = s.exp();
    let mut z = vec![0.0; n * n];
    for a in 0..n {
        for b in 0..n {
            let d: f64 = (0..e).map(|k| t[a * e + k] * i[b * e + k]).sum();
            z[a * n + b] = sc * d;
        }
    }
    z
}

/// (row log-sum-exps, column log-sum-exps) of an [n, n] matrix.
fn lse_ref(z: &[f64], n: usize) -> (Vec<f64>, Vec<f64>) {
    let lse = |it: &mut dyn Iterator<Item = f64>| {
        let v: Vec<f64> = it.collect();
        let m = v.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        m + v.iter().map(|x| (x - m).exp()).sum::<f64>().ln()
    };
    let rows = (0..n)
        .map(|a| lse(&mut (0..n).map(|b| z[a * n + b])))
        .collect();
    let cols = (0..n)
        .map(|b| lse(&mut (0..n).map(|a| z[a * n + b])))
        .collect();
    (rows, cols)
}

/// CPU reference of the loss.
pub fn clip_loss_ref(i: &[f64], t: &[f64], s: f64, n: usize, e: usize) -> f64 {
    let z = clip_logits_ref(i, t, s, n, e);
    let (lr, lc) = lse_ref(&z, n);
    let text: f64 = (0..n).map(|a| lr[a] - z[a * n + a]).sum::<f64>() / n as f64;
    let image: f64 = (0..n).map(|b| lc[b] - z[b * n + b]).sum::<f64>() / n as f64;
    (text + image) / 2.0
}

/// CPU reference of the backward for upstream gradient `dy`: (dI, dT, ds).
pub fn clip_loss_backward_ref(
    i: &[f64],
    t: &[f64],
    s: f64,
    n: usize,
    e: usize,
    dy: f64,
) -> (Vec<f64>, Vec<f64>, f64) {
    let z = clip_logits_ref(i, t, s, n, e);
    let (lr, lc) = lse_ref(&z, n);
    let sc = s.exp();
    let (mut di, mut dt, mut ds) = (vec![0.0; n * e], vec![0.0; n * e], 0.0);
    for a in 0..n {
        for b in 0..n {
            let zab = z[a * n + b];
            let delta = if a == b { 2.0 } else { 0.0 };
            let dz = dy * ((zab - lr[a]).exp() + (zab - lc[b]).exp() - delta) / (2 * n) as f64;
            ds += dz * zab;
            for k in 0..e {
                dt[a * e + k] += sc * dz * i[b * e + k];
                di[b * e + k] += sc * dz * t[a * e + k];
            }
        }
    }
    (di, dt, ds)
}

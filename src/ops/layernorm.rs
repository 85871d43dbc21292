//! LayerNorm over the last dimension (PyTorch semantics: biased variance).
//! The forward keeps each row's mean and rstd for the backward; dx is a row
//! kernel, dgamma/dbeta are deterministic column sums of per-chunk partials.
//!
//! Also home of [`Rows`]'s launches: the two layouts of the row kernels
//! (here, softmax and l2norm); the choice itself is one of the settings.

use super::{f, reduce, shader, u};
use crate::gpu::{DeviceClass, Gpu, Shader};
use crate::tape::{Tape, Var};
use crate::tensor::Tensor;
use anyhow::{ensure, Result};

const SHADER: Shader = shader!("layernorm");
/// Rows one thread sums in the dgamma/dbeta partials pass.
const CHUNK: usize = 64;

pub use crate::gpu::settings::Rows;

/// Launching the row kernels in either layout.
impl Rows {
    /// `v`, else the settings' `rows` (`CLIP_WGPU_ROWS=thread|workgroup`),
    /// else the adapter's default.
    pub fn pick(gpu: &Gpu, v: Option<Rows>) -> Rows {
        v.or(gpu.settings().rows).unwrap_or(match gpu.class {
            DeviceClass::Cpu => Rows::Thread,
            DeviceClass::Gpu => Rows::Workgroup,
        })
    }

    /// `launch`, taking the vec4 row kernel (`{base}_row4`) when a row is
    /// whole vec4s (layer norm).
    pub(crate) fn launch_cols(
        self,
        gpu: &Gpu,
        base: &str,
        rows: usize,
        cols: usize,
    ) -> (String, [u32; 3]) {
        let (mut entry, groups) = self.launch(gpu, base, rows);
        if self == Rows::Thread && cols.is_multiple_of(4) {
            entry.push('4');
        }
        (entry, groups)
    }

    /// Entry point `{base}_row` or `{base}_wg`, and its grid for `rows` rows.
    pub(crate) fn launch(self, gpu: &Gpu, base: &str, rows: usize) -> (String, [u32; 3]) {
        match self {
            Rows::Thread => (format!("{base}_row"), gpu.grid_1d(rows, 256)),
            Rows::Workgroup => (format!("{base}_wg"), gpu.grid_1d(rows, 1)),
        }
    }
}

fn check_params(x: &Tensor, gamma: &Tensor, what: &str) -> Result<(usize, usize)> {
    let cols = x.cols();
    ensure!(
        !x.shape().is_empty() && cols > 0,
        "{what}: input {:?} has no last dimension to normalise",
        x.shape()
    );
    ensure!(
        gamma.numel() == cols,
        "{what}: gamma {:?} does not match the last dimension of {:?}",
        gamma.shape(),
        x.shape()
    );
    Ok((x.rows(), cols))
}

/// (y, mean [rows], rstd [rows]) for x viewed as [rows, cols].
pub fn forward(
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    eps: f32,
) -> Result<(Tensor, Tensor, Tensor)> {
    forward_with(x, gamma, beta, eps, None)
}

/// `forward` with a forced row layout (tests, bench).
pub fn forward_with(
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    eps: f32,
    layout: Option<Rows>,
) -> Result<(Tensor, Tensor, Tensor)> {
    let (rows, cols) = check_params(x, gamma, "layernorm")?;
    ensure!(
        beta.numel() == cols,
        "layernorm: beta {:?} does not match the last dimension of {:?}",
        beta.shape(),
        x.shape()
    );
    let gpu = x.gpu();
    let y = Tensor::empty(gpu, x.shape())?;
    let mean = Tensor::empty(gpu, &[rows])?;
    let rstd = Tensor::empty(gpu, &[rows])?;
    let (entry, groups) = Rows::pick(gpu, layout).launch_cols(gpu, "forward", rows, cols);
    gpu.dispatch(
        &SHADER,
        &entry,
        &[u(rows), u(cols), f(eps), 0],
        &[
            Some(x.buffer()),
            Some(mean.buffer()),
            Some(rstd.buffer()),
            Some(beta.buffer()),
            Some(y.buffer()),
            Some(gamma.buffer()),
        ],
        groups,
    )?;
    Ok((y, mean, rstd))
}

fn check_saved(dy: &Tensor, x: &Tensor, mean: &Tensor, rstd: &Tensor, rows: usize) -> Result<()> {
    ensure!(
        dy.shape() == x.shape(),
        "layernorm backward: dy {:?} does not match x {:?}",
        dy.shape(),
        x.shape()
    );
    ensure!(
        mean.numel() == rows && rstd.numel() == rows,
        "layernorm backward: mean {:?} / rstd {:?} are not [{rows}]",
        mean.shape(),
        rstd.shape()
    );
    Ok(())
}

/// (dx, dgamma, dbeta) from the saved mean and rstd.
pub fn backward(
    dy: &Tensor,
    x: &Tensor,
    gamma: &Tensor,
    mean: &Tensor,
    rstd: &Tensor,
) -> Result<(Tensor, Tensor, Tensor)> {
    let dx = backward_dx(dy, x, gamma, mean, rstd, None)?;
    let (dgamma, dbeta) = backward_params(dy, x, mean, rstd)?;
    Ok((dx, dgamma, dbeta))
}

/// dx = rstd * (g - mean(g) - xhat * mean(g * xhat)) per row, g = gamma * dy.
pub fn backward_dx(
    dy: &Tensor,
    x: &Tensor,
    gamma: &Tensor,
    mean: &Tensor,
    rstd: &Tensor,
    layout: Option<Rows>,
) -> Result<Tensor> {
    backward_dx_into(dy, x, gamma, mean, rstd, layout, None)
}

/// `backward_dx`, added into `pending` (a gradient of x so far) when given.
pub fn backward_dx_into(
    dy: &Tensor,
    x: &Tensor,
    gamma: &Tensor,
    mean: &Tensor,
    rstd: &Tensor,
    layout: Option<Rows>,
    pending: Option<Tensor>,
) -> Result<Tensor> {
    let (rows, cols) = check_params(x, gamma, "layernorm backward")?;
    check_saved(dy, x, mean, rstd, rows)?;
    let gpu = x.gpu();
    let add = pending.is_some();
    let dx = match pending {
        Some(t) => {
            ensure!(
                t.numel() == x.numel(),
                "layernorm backward: pending gradient {:?} does not match {:?}",
                t.shape(),
                x.shape()
            );
            t
        }
        None => Tensor::empty(gpu, x.shape())?,
    };
    let (entry, groups) = Rows::pick(gpu, layout).launch_cols(gpu, "backward_dx", rows, cols);
    gpu.dispatch(
        &SHADER,
        &entry,
        &[u(rows), u(cols), 0, add as u32],
        &[
            Some(x.buffer()),
            Some(mean.buffer()),
            Some(rstd.buffer()),
            Some(dy.buffer()),
            Some(dx.buffer()),
            Some(gamma.buffer()),
        ],
        groups,
    )?;
    Ok(dx)
}

/// (dgamma, dbeta) = column sums of (dy * xhat, dy), in a fixed order:
/// per-chunk partials, then reduce::colsum over the chunks.
pub fn backward_params(
    dy: &Tensor,
    x: &Tensor,
    mean: &Tensor,
    rstd: &Tensor,
) -> Result<(Tensor, Tensor)> {
    let cols = x.cols();
    let rows = x.rows();
    check_saved(dy, x, mean, rstd, rows)?;
    let gpu = x.gpu();
    if rows == 0 {
        return Ok((Tensor::zeros(gpu, &[cols])?, Tensor::zeros(gpu, &[cols])?));
    }
    // Chunks run along the grid's y; keep them within its limit.
    let max_y = gpu.limits.max_compute_workgroups_per_dimension as usize;
    let chunk = CHUNK.max(rows.div_ceil(max_y));
    let chunks = rows.div_ceil(chunk);
    // Row `ch` of the partials holds [dgamma part | dbeta part].
    let partial = Tensor::empty(gpu, &[chunks, 2 * cols])?;
    let (entry, lanes) = super::by_vec4(cols.is_multiple_of(4), "param_partials");
    gpu.dispatch(
        &SHADER,
        &entry,
        &[u(rows), u(cols), 0, u(chunk)],
        &[
            Some(x.buffer()),
            Some(mean.buffer()),
            Some(rstd.buffer()),
            Some(dy.buffer()),
            Some(partial.buffer()),
        ],
        [u(cols / lanes).div_ceil(64), u(chunks), 1],
    )?;
    let both = if chunks == 1 {
        partial
    } else {
        reduce::colsum(&partial, chunks, 2 * cols)?
    };
    let bytes = (cols * 4) as u64;
    let dgamma = Tensor::empty(gpu, &[cols])?;
    let dbeta = Tensor::empty(gpu, &[cols])?;
    gpu.copy_range(both.buffer(), 0, dgamma.buffer(), bytes);
    gpu.copy_range(both.buffer(), bytes, dbeta.buffer(), bytes);
    Ok((dgamma, dbeta))
}

/// Tape op: LayerNorm of x over its last dimension with affine gamma, beta.
pub fn layernorm(tape: &mut Tape, x: &Var, gamma: &Var, beta: &Var, eps: f32) -> Result<Var> {
    let (y, mean, rstd) = forward(x.tensor(), gamma.tensor(), beta.tensor(), eps)?;
    Ok(record_layernorm(tape, x, gamma, beta, y, mean, rstd))
}

/// Tape op: s = x + o (a residual add) and layernorm(s), computed in one
/// kernel where the rows are whole vec4s on the per-thread layout, recorded
/// as the add node and the layer-norm node. Returns (s, layernorm(s)).
pub fn add_layernorm(
    tape: &mut Tape,
    x: &Var,
    o: &Var,
    gamma: &Var,
    beta: &Var,
    eps: f32,
) -> Result<(Var, Var)> {
    let gpu = x.tensor().gpu();
    let (rows, cols) = check_params(x.tensor(), gamma.tensor(), "layernorm")?;
    let fused = x.shape() == o.shape()
        && beta.tensor().numel() == cols
        && cols.is_multiple_of(4)
        && Rows::pick(gpu, None) == Rows::Thread;
    if !fused {
        let s = super::elementwise::add_var(tape, x, o)?;
        let h = layernorm(tape, &s, gamma, beta, eps)?;
        return Ok((s, h));
    }
    let sum = Tensor::empty(gpu, x.shape())?;
    let y = Tensor::empty(gpu, x.shape())?;
    let mean = Tensor::empty(gpu, &[rows])?;
    let rstd = Tensor::empty(gpu, &[rows])?;
    gpu.dispatch(
        &SHADER,
        "forward_add_row4",
        &[u(rows), u(cols), f(eps), 0],
        &[
            Some(x.tensor().buffer()),
            Some(mean.buffer()),
            Some(rstd.buffer()),
            Some(beta.tensor().buffer()),
            Some(y.buffer()),
            Some(gamma.tensor().buffer()),
            Some(o.tensor().buffer()),
            Some(sum.buffer()),
        ],
        gpu.grid_1d(rows, 256),
    )?;
    let s = tape.record(
        sum,
        &[x, o],
        Box::new(|dy, needs| {
            Ok(vec![
                needs[0].then(|| dy.clone()),
                needs[1].then(|| dy.clone()),
            ])
        }),
    );
    let h = record_layernorm(tape, &s, gamma, beta, y, mean, rstd);
    Ok((s, h))
}

/// Record y = layernorm(x) (computed by the caller, with its row
/// statistics) and its backward.
fn record_layernorm(
    tape: &mut Tape,
    x: &Var,
    gamma: &Var,
    beta: &Var,
    y: Tensor,
    mean: Tensor,
    rstd: Tensor,
) -> Var {
    let xs = x.tensor().clone();
    let gs = gamma.tensor().clone();
    let (gshape, bshape) = (gamma.shape().to_vec(), beta.shape().to_vec());
    tape.record_acc(
        y,
        &[x, gamma, beta],
        Box::new(move |dy, needs, acc| {
            let dx = if needs[0] {
                let pending = acc[0].take();
                Some(backward_dx_into(dy, &xs, &gs, &mean, &rstd, None, pending)?)
            } else {
                None
            };
            let (dg, db) = if needs[1] || needs[2] {
                let (dg, db) = backward_params(dy, &xs, &mean, &rstd)?;
                (
                    if needs[1] {
                        Some(dg.reshape(&gshape)?)
                    } else {
                        None
                    },
                    if needs[2] {
                        Some(db.reshape(&bshape)?)
                    } else {
                        None
                    },
                )
            } else {
                (None, None)
            };
            Ok(vec![dx, dg, db])
        }),
    )
}

/// Per-row (mean, rstd) in f64.
fn row_stats(row: &[f64], eps: f64) -> (f64, f64) {
    let n = row.len() as f64;
    let mean = row.iter().sum::<f64>() / n;
    let var = row.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / n;
    (mean, 1.0 / (var + eps).sqrt())
}

pub fn layernorm_ref(x: &[f64], gamma: &[f64], beta: &[f64], cols: usize, eps: f64) -> Vec<f64> {
    let mut out = Vec::with_capacity(x.len());
    for row in x.chunks(cols) {
        let (mean, rstd) = row_stats(row, eps);
        for (c, v) in row.iter().enumerate() {
            out.push((v - mean) * rstd * gamma[c] + beta[c]);
        }
    }
    out
}

/// (dx, dgamma, dbeta) in f64.
pub fn layernorm_backward_ref(
    dy: &[f64],
    x: &[f64],
    gamma: &[f64],
    cols: usize,
    eps: f64,
) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let mut dx = Vec::with_capacity(x.len());
    let mut dgamma = vec![0.0; cols];
    let mut dbeta = vec![0.0; cols];
    let n = cols as f64;
    for (row, drow) in x.chunks(cols).zip(dy.chunks(cols)) {
        let (mean, rstd) = row_stats(row, eps);
        let xhat: Vec<f64> = row.iter().map(|v| (v - mean) * rstd).collect();
        let g: Vec<f64> = drow.iter().zip(gamma).map(|(d, w)| d * w).collect();
        let mg = g.iter().sum::<f64>() / n;
        let mgx = g.iter().zip(&xhat).map(|(a, b)| a * b).sum::<f64>() / n;
        for c in 0..cols {
            dx.push(rstd * (g[c] - mg - xhat[c] * mgx));
            dgamma[c] += drow[c] * xhat[c];
            dbeta[c] += drow[c];
        }
    }
    (dx, dgamma, dbeta)
}

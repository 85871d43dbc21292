//! Deterministic reductions: column sums (bias and LayerNorm parameter
//! gradients, broadcast backward) and sums of squares (gradient norm).

use super::{by_vec4, shader, u};
use crate::gpu::settings::Rows;
use crate::gpu::{Shader, Window};
use crate::tensor::Tensor;
use anyhow::{ensure, Result};

const SHADER: Shader = shader!("reduce");
/// Rows one thread sums in the first pass over a tall input.
const CHUNK: usize = 64;

/// out[c] = sum_r x[r, c] for x viewed as [rows, cols]; adds into `out`
/// when `accumulate`.
pub fn colsum_into(
    x: &Tensor,
    rows: usize,
    cols: usize,
    out: &Tensor,
    accumulate: bool,
) -> Result<()> {
    ensure!(
        rows * cols == x.numel(),
        "colsum: {rows}x{cols} does not match {:?}",
        x.shape()
    );
    ensure!(
        out.numel() == cols,
        "colsum: output has {} values, want {cols}",
        out.numel()
    );
    let gpu = x.gpu();
    // Whole vec4s of columns where the width allows (same sums, same order).
    let (entry, lanes) = by_vec4(cols.is_multiple_of(4), "colsum");
    let cgroups = u(cols / lanes).div_ceil(64);
    if rows <= 4 * CHUNK {
        return gpu.dispatch(
            &SHADER,
            &entry,
            &[u(rows), u(cols), u(rows.max(1)), accumulate as u32],
            &[Some(x.buffer()), Some(out.buffer())],
            [cgroups, 1, 1],
        );
    }
    let chunks = rows.div_ceil(CHUNK);
    let partial = Tensor::empty(gpu, &[chunks, cols])?;
    gpu.dispatch(
        &SHADER,
        &entry,
        &[u(rows), u(cols), u(CHUNK), 0],
        &[Some(x.buffer()), Some(partial.buffer())],
        [cgroups, u(chunks), 1],
    )?;
    colsum_into(&partial, chunks, cols, out, accumulate)
}

/// Column sums as a new [cols] tensor.
pub fn colsum(x: &Tensor, rows: usize, cols: usize) -> Result<Tensor> {
    let out = Tensor::empty(x.gpu(), &[cols])?;
    colsum_into(x, rows, cols, &out, false)?;
    Ok(out)
}

/// Sum of squares of all elements, as a [1] tensor.
pub fn sumsq(x: &Tensor) -> Result<Tensor> {
    sumsq_with(x, None)
}

/// `sumsq` with the partials' layout forced (tests), `None` per adapter.
pub fn sumsq_with(x: &Tensor, layout: Option<Rows>) -> Result<Tensor> {
    let partial = Tensor::empty(x.gpu(), &[sumsq_partials(x.numel())])?;
    sumsq_partials_with(x, &partial, 0, layout)?;
    // The partials are summed by the column-sum kernel (one column).
    colsum(&partial, partial.numel(), 1)
}

/// How many partial sums `sumsq_partials_into` writes for n elements.
pub fn sumsq_partials(n: usize) -> usize {
    n.div_ceil(CHUNK * 4).max(1)
}

/// Partial sums of squares of x (each over a fixed chunk, in order) into
/// out[offset..offset + sumsq_partials(n)]: several tensors' partials can
/// share one buffer and be summed once.
pub fn sumsq_partials_into(x: &Tensor, out: &Tensor, offset: usize) -> Result<()> {
    sumsq_partials_with(x, out, offset, None)
}

/// `sumsq_partials_into` in a layout: a thread a chunk (CPU adapters), or
/// on GPUs a workgroup a chunk, whose threads read consecutive elements
/// (coalesced) and add them in a fixed tree.
fn sumsq_partials_with(
    x: &Tensor,
    out: &Tensor,
    offset: usize,
    layout: Option<Rows>,
) -> Result<()> {
    let n = x.numel();
    let chunks = sumsq_partials(n);
    ensure!(
        offset + chunks <= out.numel(),
        "sumsq: {chunks} partials at {offset} do not fit in {:?}",
        out.shape()
    );
    let gpu = x.gpu();
    let wg = Rows::pick(gpu, layout) == Rows::Workgroup;
    let entry = if wg {
        "sumsq_wg".to_string()
    } else {
        by_vec4(n.is_multiple_of(4), "sumsq").0
    };
    // Windows of whole chunks (a tensor beyond the adapter's binding
    // limit): the same partials, each over the same elements.
    for (e0, len) in gpu.elem_windows(n, CHUNK * 4) {
        let groups = if wg {
            gpu.grid_1d(sumsq_partials(len), 1)
        } else {
            [u(sumsq_partials(len)).div_ceil(64), 1, 1]
        };
        let window = Window::elems(x.buffer(), e0, len, n);
        gpu.dispatch_windows(
            &SHADER,
            &entry,
            &[],
            &[u(len), u(offset + e0 / (CHUNK * 4)), u(CHUNK * 4), 0],
            &[Some(window), Some(Window::whole(out.buffer()))],
            groups,
        )?;
    }
    Ok(())
}

pub fn colsum_ref(x: &[f64], rows: usize, cols: usize) -> Vec<f64> {
    let mut out = vec![0.0; cols];
    for r in 0..rows {
        for c in 0..cols {
            out[c] += x[r * cols + c];
        }
    }
    out
}

//! Elementwise add (with broadcast of the second operand: residual streams,
//! biases, position embeddings) and in-place gradient accumulation.

use super::{by_vec4, reduce, shader, u};
use crate::gpu::Shader;
use crate::tape::{Tape, Var};
use crate::tensor::Tensor;
use anyhow::{ensure, Result};

const SHADER: Shader = shader!("elementwise");
const ACC: Shader = shader!("accumulate");

/// a + b, where b's element count divides a's and b repeats (broadcast over
/// leading dimensions).
pub fn add(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let (n, nb) = (a.numel(), b.numel());
    ensure!(
        nb > 0 && n % nb == 0,
        "add: {:?} does not broadcast over {:?}",
        b.shape(),
        a.shape()
    );
    let gpu = a.gpu();
    let out = Tensor::empty(gpu, a.shape())?;
    // Whole vec4s where both extents allow.
    let (entry, w) = by_vec4(n.is_multiple_of(4) && nb.is_multiple_of(4), "add");
    gpu.dispatch(
        &SHADER,
        &entry,
        &[u(n), u(nb), 0, 0],
        &[Some(a.buffer()), Some(b.buffer()), Some(out.buffer())],
        gpu.grid_1d(n / w, 256),
    )?;
    Ok(out)
}

/// acc += g (same element count).
pub fn add_assign(acc: &Tensor, g: &Tensor) -> Result<()> {
    ensure!(
        acc.numel() == g.numel(),
        "add_assign: {:?} vs {:?}",
        acc.shape(),
        g.shape()
    );
    let gpu = acc.gpu();
    let n = acc.numel();
    let (entry, w) = by_vec4(n.is_multiple_of(4), "add_assign");
    gpu.dispatch(
        &ACC,
        &entry,
        &[u(n), 0, 0, 0],
        &[Some(g.buffer()), Some(acc.buffer())],
        gpu.grid_1d(n / w, 256),
    )
}

/// Tape op: a + b with broadcast; db sums dy over the repeats.
pub fn add_var(tape: &mut Tape, a: &Var, b: &Var) -> Result<Var> {
    let out = add(a.tensor(), b.tensor())?;
    let (n, nb) = (a.tensor().numel(), b.tensor().numel());
    let bshape = b.shape().to_vec();
    Ok(tape.record(
        out,
        &[a, b],
        Box::new(move |dy, needs| {
            let da = needs[0].then(|| dy.clone());
            let db = if !needs[1] {
                None
            } else if n == nb {
                Some(dy.clone())
            } else {
                Some(reduce::colsum(dy, n / nb, nb)?.reshape(&bshape)?)
            };
            Ok(vec![da, db])
        }),
    ))
}

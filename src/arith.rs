//! The tensor arithmetic the tape itself needs to sum gradients: a + b
//! (with broadcast of the second operand) and in-place acc += g. It sits
//! below both the tape and the ops (which depend on the tape), so the tape
//! depends on no op; `ops::elementwise` re-exports both next to its tape op.

use crate::gpu::{Shader, Window};
use crate::tensor::Tensor;
use anyhow::{ensure, Result};

const SHADER: Shader = Shader {
    name: "elementwise",
    source: crate::shaders::source("elementwise"),
};
const ACC: Shader = Shader {
    name: "accumulate",
    source: crate::shaders::source("accumulate"),
};

/// `usize` as a u32 kernel parameter.
fn u(x: usize) -> u32 {
    u32::try_from(x).expect("size fits in u32")
}

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
    // Whole vec4s (four values a thread) where both extents allow.
    let (entry, w) = if n.is_multiple_of(4) && nb.is_multiple_of(4) {
        ("add4", 4)
    } else {
        ("add", 1)
    };
    gpu.dispatch(
        &SHADER,
        entry,
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
    let (entry, w) = if n.is_multiple_of(4) {
        ("add_assign4", 4)
    } else {
        ("add_assign", 1)
    };
    // Windows where the tensors exceed the adapter's binding limit (a
    // gradient of roberta-base's word embedding on lavapipe).
    for (e0, len) in gpu.elem_windows(n, w) {
        gpu.dispatch_windows(
            &ACC,
            entry,
            &[],
            &[u(len), 0, 0, 0],
            &[
                Some(Window::elems(g.buffer(), e0, len, n)),
                Some(Window::elems(acc.buffer(), e0, len, n)),
            ],
            gpu.grid_1d(len / w, 256),
        )?;
    }
    Ok(())
}

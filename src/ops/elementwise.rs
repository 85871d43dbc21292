//! Elementwise add (with broadcast of the second operand: residual streams,
//! biases, position embeddings) and in-place gradient accumulation. The
//! kernels live in [`crate::arith`] (the tape sums gradients with them);
//! this module adds the tape op.

use super::reduce;
use crate::tape::{Tape, Var};
use anyhow::Result;

pub use crate::arith::{add, add_assign};

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

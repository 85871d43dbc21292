//! Gradient checkpointing (transformers' `gradient_checkpointing`): a block
//! runs its forward without recording, keeping only its input; its backward
//! runs the forward again on a tape of its own and backpropagates through
//! that. Activation memory then holds one block's intermediates at a time
//! instead of every layer's, for one more forward of compute. Exact: the
//! kernels are deterministic, so the recomputed forward is the same.

use super::params::ParamVars;
use crate::ops::softmax::Mask;
use crate::tape::{Tape, Var};
use crate::tensor::Tensor;
use anyhow::Result;

/// `block(tape, p, x)` with only `x` kept for the backward. `params` lists
/// the store indices the block reads (the only ones it may use); gradients
/// go to `x` and to those of them that train.
pub fn checkpointed<F>(
    tape: &mut Tape,
    p: &ParamVars,
    params: &[usize],
    x: &Var,
    block: F,
) -> Result<Var>
where
    F: Fn(&mut Tape, &ParamVars, &Var) -> Result<Var> + 'static,
{
    if !tape.grad_enabled() {
        return block(tape, p, x);
    }
    let precision = tape.precision();
    let out = block(&mut Tape::no_grad().with_precision(precision), p, x)?.into_tensor();
    let mut inputs = vec![x];
    inputs.extend(params.iter().map(|&i| &p[i]));
    let saved_x = x.tensor().clone();
    // The block's own parameters; the rest of the store stays out of the
    // closure (placeholders are never read: `params` lists all it uses).
    let saved: Vec<(usize, Tensor)> = params.iter().map(|&i| (i, p[i].tensor().clone())).collect();
    let n = p.0.len();
    Ok(tape.record(
        out,
        &inputs,
        Box::new(move |dy, needs| {
            let mut t = Tape::new().with_precision(precision);
            let xv = if needs[0] {
                t.param(saved_x.clone())
            } else {
                Var::constant(saved_x.clone())
            };
            let mut vars = vec![Var::constant(saved_x); n];
            for (k, (i, w)) in saved.iter().enumerate() {
                vars[*i] = if needs[k + 1] {
                    t.param(w.clone())
                } else {
                    Var::constant(w.clone())
                };
            }
            let pv = ParamVars(vars);
            let y = block(&mut t, &pv, &xv)?;
            let mut g = t.backward_with(&y, dy.clone())?;
            let mut grads = vec![g.take(&xv)];
            grads.extend(saved.iter().map(|(i, _)| g.take(&pv[*i])));
            Ok(grads)
        }),
    ))
}

/// An encoder layer, as the towers run it with or without checkpointing.
pub trait EncoderLayer: Clone + 'static {
    /// Store indices of the layer's parameters (all it reads).
    fn params(&self) -> Vec<usize>;
    fn forward(&self, tape: &mut Tape, p: &ParamVars, x: &Var, mask: &Mask) -> Result<Var>;

    /// `forward`, its activations recomputed in the backward (gradient
    /// checkpointing) when `checkpoint`.
    fn forward_ckpt(
        &self,
        tape: &mut Tape,
        p: &ParamVars,
        x: &Var,
        mask: &Mask,
        checkpoint: bool,
    ) -> Result<Var> {
        if !checkpoint {
            return self.forward(tape, p, x, mask);
        }
        let (layer, mask) = (self.clone(), mask.clone());
        checkpointed(tape, p, &self.params(), x, move |t, p, x| {
            layer.forward(t, p, x, &mask)
        })
    }
}

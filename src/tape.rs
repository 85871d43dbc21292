//! Autograd tape. Each op computes its forward on the GPU and records a
//! closure that computes its input gradients from its output gradient.
//! `backward` runs the closures in reverse; gradients of a value used more
//! than once are summed. Closures own the tensors they saved, so those go
//! back to the pool as soon as their node has run.

use crate::arith;
use crate::precision::Precision;
use crate::tensor::Tensor;
use anyhow::{ensure, Result};
use std::collections::HashMap;

pub type VarId = usize;

/// A tensor on the tape. `id` is `None` for constants and frozen parameters:
/// nothing flows back to them.
#[derive(Clone, Debug)]
pub struct Var {
    t: Tensor,
    id: Option<VarId>,
}

impl Var {
    /// A value that receives no gradient.
    pub fn constant(t: Tensor) -> Var {
        Var { t, id: None }
    }
    pub fn tensor(&self) -> &Tensor {
        &self.t
    }
    pub fn into_tensor(self) -> Tensor {
        self.t
    }
    pub fn shape(&self) -> &[usize] {
        self.t.shape()
    }
    pub fn requires_grad(&self) -> bool {
        self.id.is_some()
    }
    pub fn id(&self) -> Option<VarId> {
        self.id
    }
}

/// Input gradients from the output gradient; `needs[i]` says whether input
/// `i` wants one (frozen inputs are skipped, so no dW is computed for them).
pub type BackwardFn = Box<dyn FnOnce(&Tensor, &[bool]) -> Result<Vec<Option<Tensor>>>>;

/// A backward that can add input gradients into the pending ones in its own
/// kernels (no separate add pass): `acc[i]` holds input `i`'s gradient so
/// far when nothing but the tape holds it; the op may take it, add into it
/// and return it as input `i`'s gradient (the whole sum).
pub type AccBackwardFn =
    Box<dyn FnOnce(&Tensor, &[bool], &mut [Option<Tensor>]) -> Result<Vec<Option<Tensor>>>>;

enum Backward {
    Plain(BackwardFn),
    Acc(AccBackwardFn),
}

struct Node {
    out: VarId,
    inputs: Vec<Option<VarId>>,
    backward: Backward,
}

pub struct Tape {
    nodes: Vec<Node>,
    next: VarId,
    grad_enabled: bool,
    /// Where ops round and what they keep for the backward (`--fp16`,
    /// `--bf16`: see `ops::convert`).
    precision: Precision,
}

/// Gradients of the leaves (parameters) after `backward`.
#[derive(Default)]
pub struct Grads {
    map: HashMap<VarId, Tensor>,
}

impl Grads {
    pub fn get(&self, v: &Var) -> Option<&Tensor> {
        v.id.and_then(|id| self.map.get(&id))
    }
    pub fn take(&mut self, v: &Var) -> Option<Tensor> {
        v.id.and_then(|id| self.map.remove(&id))
    }
    /// Give leaf `v` a gradient to add into (ignored when `v` gets none).
    pub fn insert(&mut self, v: &Var, g: Tensor) {
        if let Some(id) = v.id {
            self.map.insert(id, g);
        }
    }
    pub fn len(&self) -> usize {
        self.map.len()
    }
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

impl Default for Tape {
    fn default() -> Self {
        Self::new()
    }
}

impl Tape {
    pub fn new() -> Tape {
        Tape {
            nodes: Vec::new(),
            next: 0,
            grad_enabled: true,
            precision: Precision::F32,
        }
    }

    /// Evaluation mode: ops compute forward only and record nothing.
    pub fn no_grad() -> Tape {
        Tape {
            grad_enabled: false,
            ..Tape::new()
        }
    }

    pub fn grad_enabled(&self) -> bool {
        self.grad_enabled
    }

    /// The same tape computing at precision `p`.
    pub fn with_precision(mut self, p: Precision) -> Tape {
        self.precision = p;
        self
    }

    pub fn precision(&self) -> Precision {
        self.precision
    }

    /// Number of recorded nodes (for tests).
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    fn fresh(&mut self) -> VarId {
        self.next += 1;
        self.next
    }

    /// A trainable leaf: its gradient is kept by `backward`.
    pub fn param(&mut self, t: Tensor) -> Var {
        let id = self.grad_enabled.then(|| self.fresh());
        Var { t, id }
    }

    /// A leaf that gets no gradient (frozen weights, inputs).
    pub fn frozen(&mut self, t: Tensor) -> Var {
        Var::constant(t)
    }

    /// Record an op's output. When no input needs a gradient (or in
    /// no-grad mode) the closure is dropped at once with what it saved.
    pub fn record(&mut self, out: Tensor, inputs: &[&Var], backward: BackwardFn) -> Var {
        self.push(out, inputs, Backward::Plain(backward))
    }

    /// `record` for an op whose backward adds into pending gradients.
    pub fn record_acc(&mut self, out: Tensor, inputs: &[&Var], backward: AccBackwardFn) -> Var {
        self.push(out, inputs, Backward::Acc(backward))
    }

    fn push(&mut self, out: Tensor, inputs: &[&Var], backward: Backward) -> Var {
        if !self.grad_enabled || inputs.iter().all(|v| v.id.is_none()) {
            return Var::constant(out);
        }
        let id = self.fresh();
        self.nodes.push(Node {
            out: id,
            inputs: inputs.iter().map(|v| v.id).collect(),
            backward,
        });
        Var {
            t: out,
            id: Some(id),
        }
    }

    /// Backpropagate from a scalar loss (seed gradient 1).
    pub fn backward(&mut self, loss: &Var) -> Result<Grads> {
        ensure!(
            loss.t.numel() == 1,
            "backward needs a scalar loss, got shape {:?}",
            loss.t.shape()
        );
        let one = Tensor::scalar(loss.t.gpu(), 1.0)?.reshape(loss.t.shape())?;
        self.backward_with(loss, one)
    }

    /// Backpropagate `grad` from `out`. Consumes the recorded nodes.
    pub fn backward_with(&mut self, out: &Var, grad: Tensor) -> Result<Grads> {
        self.backward_seeded(vec![(out, grad)], Grads::default())
    }

    /// Backpropagate from several outputs at once, each seeded with its
    /// gradient, adding into `into`: gradients the leaves already hold (from
    /// earlier micro-batches), so each new contribution is summed into them
    /// as it is made and no second set of gradients is ever held.
    pub fn backward_seeded(&mut self, seeds: Vec<(&Var, Tensor)>, into: Grads) -> Result<Grads> {
        let mut grads = into.map;
        for (out, grad) in seeds {
            ensure!(
                grad.shape() == out.t.shape(),
                "seed gradient shape {:?} does not match output {:?}",
                grad.shape(),
                out.t.shape()
            );
            if let Some(id) = out.id {
                accumulate(&mut grads, id, grad)?;
            }
        }
        while let Some(node) = self.nodes.pop() {
            let Some(g) = grads.remove(&node.out) else {
                continue; // does not reach the loss
            };
            let needs: Vec<bool> = node.inputs.iter().map(Option::is_some).collect();
            let input_grads = match node.backward {
                Backward::Plain(f) => f(&g, &needs)?,
                Backward::Acc(f) => {
                    // Lend the op the pending gradients only the tape holds;
                    // those it does not take go back.
                    let mut acc: Vec<Option<Tensor>> = node
                        .inputs
                        .iter()
                        .map(|inp| {
                            let id = (*inp)?;
                            grads.get(&id)?.is_unique().then(|| grads.remove(&id))?
                        })
                        .collect();
                    let out = f(&g, &needs, &mut acc)?;
                    for (inp, left) in node.inputs.iter().zip(acc) {
                        if let (Some(id), Some(left)) = (inp, left) {
                            grads.insert(*id, left);
                        }
                    }
                    out
                }
            };
            drop(g);
            for (inp, gi) in node.inputs.iter().zip(input_grads) {
                if let (Some(id), Some(gi)) = (inp, gi) {
                    accumulate(&mut grads, *id, gi)?;
                }
            }
        }
        Ok(Grads { map: grads })
    }
}

fn accumulate(grads: &mut HashMap<VarId, Tensor>, id: VarId, g: Tensor) -> Result<()> {
    match grads.remove(&id) {
        None => {
            grads.insert(id, g);
        }
        Some(prev) => {
            ensure!(
                prev.numel() == g.numel(),
                "gradient shapes disagree: {:?} vs {:?}",
                prev.shape(),
                g.shape()
            );
            // Sum in place only into a buffer nobody else holds (a backward
            // may hand the same tensor to two inputs, e.g. a residual add).
            let sum = if prev.is_unique() {
                arith::add_assign(&prev, &g)?;
                prev
            } else {
                arith::add(&prev, &g)?
            };
            grads.insert(id, sum);
        }
    }
    Ok(())
}

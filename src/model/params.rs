//! The parameters of a model by Hugging Face name, on the GPU. Towers keep
//! indices into the store; each forward pass turns the store into tape
//! variables (trainable or frozen) and reads gradients back by index.

use super::weights::{HostTensor, Weights};
use crate::tape::{Grads, Tape, Var};
use crate::tensor::Tensor;
use crate::Gpu;
use anyhow::{bail, Result};
use std::sync::Arc;

pub struct Param {
    pub name: String,
    pub tensor: Tensor,
    /// False for frozen towers: no gradient is computed for it.
    pub trainable: bool,
}

#[derive(Default)]
pub struct ParamStore {
    pub params: Vec<Param>,
}

/// The tape variables of one forward pass, indexed like the store.
pub struct ParamVars(pub Vec<Var>);

impl std::ops::Index<usize> for ParamVars {
    type Output = Var;
    fn index(&self, i: usize) -> &Var {
        &self.0[i]
    }
}

/// Expected names and shapes, collected while a model lays out its towers.
#[derive(Default)]
pub struct Layout {
    pub specs: Vec<(String, Vec<usize>)>,
}

impl Layout {
    /// Register a parameter; returns its index.
    pub fn add(&mut self, name: impl Into<String>, shape: &[usize]) -> usize {
        self.specs.push((name.into(), shape.to_vec()));
        self.specs.len() - 1
    }
}

impl ParamStore {
    /// Upload `weights` for the names in `layout`. Missing, wrongly shaped and
    /// unexpected tensors are reported together in one error (old
    /// `position_ids` buffers are ignored).
    pub fn from_weights(
        gpu: &Arc<Gpu>,
        layout: &Layout,
        weights: &Weights,
        what: &str,
    ) -> Result<ParamStore> {
        let mut missing = Vec::new();
        let mut wrong = Vec::new();
        let mut integer = Vec::new();
        for (name, shape) in &layout.specs {
            match weights.tensors.get(name) {
                // A weight stored with an integer dtype: say so, rather than
                // call it both missing and unexpected.
                None if weights.ints.contains_key(name) => integer.push(name.clone()),
                None => missing.push(name.clone()),
                Some(t) if !same_shape(&t.shape, shape) => wrong.push(format!(
                    "{name}: file has {:?}, model needs {:?}",
                    t.shape, shape
                )),
                Some(_) => {}
            }
        }
        let expected: std::collections::HashSet<&str> =
            layout.specs.iter().map(|(n, _)| n.as_str()).collect();
        let unexpected: Vec<&String> = weights
            .tensors
            .keys()
            .chain(weights.ints.keys())
            .filter(|n| {
                !expected.contains(n.as_str())
                    && !n.ends_with("position_ids")
                    && !integer.contains(*n)
            })
            .collect();
        if !missing.is_empty() || !wrong.is_empty() || !unexpected.is_empty() || !integer.is_empty()
        {
            let mut msg = format!("{what} does not match the model config:");
            if !integer.is_empty() {
                msg += &format!(
                    "\n  stored as integers, but the model needs floating-point weights \
                     (F32, F64, F16 or BF16): {}",
                    list(&integer)
                );
            }
            if !missing.is_empty() {
                msg += &format!(
                    "\n  missing {} tensor(s): {}",
                    missing.len(),
                    list(&missing)
                );
            }
            if !wrong.is_empty() {
                msg += &format!("\n  wrong shape: {}", wrong.join("; "));
            }
            if !unexpected.is_empty() {
                msg += &format!(
                    "\n  unexpected {} tensor(s): {}",
                    unexpected.len(),
                    list(&unexpected)
                );
            }
            bail!(msg);
        }
        let mut store = ParamStore::default();
        for (name, shape) in &layout.specs {
            let t = &weights.tensors[name];
            store.params.push(Param {
                name: name.clone(),
                tensor: Tensor::from_slice(gpu, &t.data, shape)?,
                trainable: true,
            });
        }
        Ok(store)
    }

    /// One tape variable per parameter.
    pub fn vars(&self, tape: &mut Tape) -> ParamVars {
        ParamVars(
            self.params
                .iter()
                .map(|p| {
                    if p.trainable {
                        tape.param(p.tensor.clone())
                    } else {
                        tape.frozen(p.tensor.clone())
                    }
                })
                .collect(),
        )
    }

    /// Gradients in store order (`None` for frozen or unused parameters).
    pub fn grads(&self, vars: &ParamVars, grads: &mut Grads) -> Vec<Option<Tensor>> {
        vars.0.iter().map(|v| grads.take(v)).collect()
    }

    /// Gradients held so far (store order, from `grads` of an earlier
    /// tape) as pending gradients of this tape's variables, for
    /// `Tape::backward_seeded` to add into.
    pub fn pending(&self, vars: &ParamVars, held: Vec<Option<Tensor>>) -> Grads {
        let mut g = Grads::default();
        for (v, t) in vars.0.iter().zip(held) {
            if let Some(t) = t {
                g.insert(v, t);
            }
        }
        g
    }

    pub fn index_of(&self, name: &str) -> Option<usize> {
        self.params.iter().position(|p| p.name == name)
    }

    /// Read every parameter back to the host, in store order.
    pub fn to_host(&self) -> Result<Vec<(String, HostTensor)>> {
        self.params
            .iter()
            .map(|p| {
                Ok((
                    p.name.clone(),
                    HostTensor::new(p.tensor.shape(), p.tensor.to_vec()?),
                ))
            })
            .collect()
    }
}

/// A scalar stored with shape [] matches our [1].
fn same_shape(file: &[usize], model: &[usize]) -> bool {
    file == model || (file.is_empty() && model == [1])
}

fn list<T: AsRef<str>>(names: &[T]) -> String {
    let shown: Vec<&str> = names.iter().take(8).map(|s| s.as_ref()).collect();
    let more = names.len().saturating_sub(8);
    if more > 0 {
        format!("{} and {more} more", shown.join(", "))
    } else {
        shown.join(", ")
    }
}

/// The Trainer's rule: no weight decay for biases and the parameters of
/// LayerNorm modules (CLIP's `layer_norm1/2`, `pre_layrnorm` [sic],
/// `post_layernorm`, `final_layer_norm`; RoBERTa's `LayerNorm`).
pub fn decays(name: &str) -> bool {
    let lower = name.to_ascii_lowercase();
    let is_norm = ["layer_norm", "layernorm", "layrnorm"]
        .iter()
        .any(|k| lower.contains(k));
    !(lower.contains("bias") || is_norm)
}

//! Building blocks shared by the towers: linear, layer norm and CLIP's
//! pre-LN encoder layer, as indices into the parameter store.

use super::params::{Layout, ParamVars};
use super::recompute::EncoderLayer;
use crate::ops::activation::Act;
use crate::ops::attention::attention;
use crate::ops::elementwise::add_var;
use crate::ops::embedding::embedding;
use crate::ops::layernorm::{add_layernorm, layernorm};
use crate::ops::matmul::linear;
use crate::ops::mlp::mlp;
use crate::ops::softmax::Mask;
use crate::tape::{Tape, Var};
use anyhow::Result;

#[derive(Clone, Copy)]
pub struct Linear {
    pub w: usize,
    pub b: Option<usize>,
}

impl Linear {
    /// nn.Linear(in, out): `{prefix}.weight` [out, in] and `{prefix}.bias` [out].
    pub fn new(l: &mut Layout, prefix: &str, inp: usize, out: usize, bias: bool) -> Linear {
        Linear {
            w: l.add(format!("{prefix}.weight"), &[out, inp]),
            b: bias.then(|| l.add(format!("{prefix}.bias"), &[out])),
        }
    }
    pub fn forward(&self, tape: &mut Tape, v: &ParamVars, x: &Var) -> Result<Var> {
        linear(tape, x, &v[self.w], self.b.map(|b| &v[b]))
    }
}

#[derive(Clone, Copy)]
pub struct LayerNorm {
    pub g: usize,
    pub b: usize,
    pub eps: f32,
}

impl LayerNorm {
    pub fn new(l: &mut Layout, prefix: &str, dim: usize, eps: f32) -> LayerNorm {
        LayerNorm {
            g: l.add(format!("{prefix}.weight"), &[dim]),
            b: l.add(format!("{prefix}.bias"), &[dim]),
            eps,
        }
    }
    pub fn forward(&self, tape: &mut Tape, v: &ParamVars, x: &Var) -> Result<Var> {
        layernorm(tape, x, &v[self.g], &v[self.b], self.eps)
    }
    /// (x + o, layernorm(x + o)): a residual add folded into this norm.
    pub fn forward_add(
        &self,
        tape: &mut Tape,
        v: &ParamVars,
        x: &Var,
        o: &Var,
    ) -> Result<(Var, Var)> {
        add_layernorm(tape, x, o, &v[self.g], &v[self.b], self.eps)
    }
}

/// CLIPEncoderLayer: x += attn(ln1(x)); x += fc2(act(fc1(ln2(x)))).
#[derive(Clone)]
pub struct ClipEncoderLayer {
    ln1: LayerNorm,
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    ln2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    heads: usize,
    act: Act,
}

impl ClipEncoderLayer {
    pub fn new(
        l: &mut Layout,
        prefix: &str,
        dim: usize,
        mlp: usize,
        heads: usize,
        eps: f32,
        act: Act,
    ) -> ClipEncoderLayer {
        let a = format!("{prefix}.self_attn");
        ClipEncoderLayer {
            ln1: LayerNorm::new(l, &format!("{prefix}.layer_norm1"), dim, eps),
            k: Linear::new(l, &format!("{a}.k_proj"), dim, dim, true),
            v: Linear::new(l, &format!("{a}.v_proj"), dim, dim, true),
            q: Linear::new(l, &format!("{a}.q_proj"), dim, dim, true),
            o: Linear::new(l, &format!("{a}.out_proj"), dim, dim, true),
            ln2: LayerNorm::new(l, &format!("{prefix}.layer_norm2"), dim, eps),
            fc1: Linear::new(l, &format!("{prefix}.mlp.fc1"), dim, mlp, true),
            fc2: Linear::new(l, &format!("{prefix}.mlp.fc2"), mlp, dim, true),
            heads,
            act,
        }
    }
}

impl ClipEncoderLayer {
    /// The layer's output at `rows` of its input viewed [B*T, D] only,
    /// [rows, D]: attention over every key and value, then the output
    /// projection, residual, layer norm and MLP of those rows alone. The
    /// same values as `forward` then a gather of the rows (rounded as
    /// matmuls of other shapes round): what the last layer of a tower whose
    /// output is one pooled token needs, for about a quarter of its work.
    pub fn forward_rows(
        &self,
        tape: &mut Tape,
        p: &ParamVars,
        x: &Var,
        mask: &Mask,
        rows: &[u32],
    ) -> Result<Var> {
        let h = self.ln1.forward(tape, p, x)?;
        let q = self.q.forward(tape, p, &h)?;
        let k = self.k.forward(tape, p, &h)?;
        let v = self.v.forward(tape, p, &h)?;
        let a = attention(tape, &q, &k, &v, self.heads, mask)?;
        let n = rows.len();
        let a = embedding(tape, &a, rows, &[n])?;
        let x = embedding(tape, x, rows, &[n])?;
        let o = self.o.forward(tape, p, &a)?;
        let (x, h) = self.ln2.forward_add(tape, p, &x, &o)?;
        let fc1 = (&p[self.fc1.w], self.fc1.b.map(|b| &p[b]));
        let fc2 = (&p[self.fc2.w], self.fc2.b.map(|b| &p[b]));
        let h = mlp(tape, &h, fc1, fc2, self.act)?;
        add_var(tape, &x, &h)
    }
}

impl EncoderLayer for ClipEncoderLayer {
    fn params(&self) -> Vec<usize> {
        let norms = [self.ln1, self.ln2].into_iter().flat_map(|l| [l.g, l.b]);
        let linears = [self.q, self.k, self.v, self.o, self.fc1, self.fc2]
            .into_iter()
            .flat_map(|l| std::iter::once(l.w).chain(l.b));
        norms.chain(linears).collect()
    }

    fn forward(&self, tape: &mut Tape, p: &ParamVars, x: &Var, mask: &Mask) -> Result<Var> {
        let h = self.ln1.forward(tape, p, x)?;
        let q = self.q.forward(tape, p, &h)?;
        let k = self.k.forward(tape, p, &h)?;
        let v = self.v.forward(tape, p, &h)?;
        let a = attention(tape, &q, &k, &v, self.heads, mask)?;
        let o = self.o.forward(tape, p, &a)?;
        let (x, h) = self.ln2.forward_add(tape, p, x, &o)?;
        let fc1 = (&p[self.fc1.w], self.fc1.b.map(|b| &p[b]));
        let fc2 = (&p[self.fc2.w], self.fc2.b.map(|b| &p[b]));
        let h = mlp(tape, &h, fc1, fc2, self.act)?;
        add_var(tape, &x, &h)
    }
}

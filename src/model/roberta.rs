//! RoBERTa text tower (the text side of VisionTextDualEncoderModel in
//! run_clip.py): post-LN encoder, erf GELU, position ids counted over
//! non-padding tokens from padding_idx + 1, pooled = tanh(dense(h[<s>])).

use super::clip_text::keep_prefix;
use super::config::RobertaConfig;
use super::layers::{LayerNorm, Linear};
use super::params::{Layout, ParamVars};
use super::recompute::EncoderLayer;
use crate::ops::activation::{act, Act};
use crate::ops::attention::attention;
use crate::ops::elementwise::add_var;
use crate::ops::embedding::embedding;
use crate::ops::mlp::mlp;
use crate::ops::softmax::Mask;
use crate::tape::{Tape, Var};
use crate::tensor::Tensor;
use anyhow::{ensure, Result};

#[derive(Clone)]
struct RobertaLayer {
    q: Linear,
    k: Linear,
    v: Linear,
    attn_out: Linear,
    attn_ln: LayerNorm,
    inter: Linear,
    out: Linear,
    out_ln: LayerNorm,
    heads: usize,
    act: Act,
}

impl EncoderLayer for RobertaLayer {
    fn params(&self) -> Vec<usize> {
        let norms = [self.attn_ln, self.out_ln]
            .into_iter()
            .flat_map(|l| [l.g, l.b]);
        let linears = [self.q, self.k, self.v, self.attn_out, self.inter, self.out]
            .into_iter()
            .flat_map(|l| std::iter::once(l.w).chain(l.b));
        norms.chain(linears).collect()
    }

    /// Post-LN: h = LN(x + attn(x)); LN(h + out(act(inter(h)))).
    fn forward(&self, tape: &mut Tape, p: &ParamVars, x: &Var, m: &Mask) -> Result<Var> {
        let q = self.q.forward(tape, p, x)?;
        let k = self.k.forward(tape, p, x)?;
        let v = self.v.forward(tape, p, x)?;
        let a = attention(tape, &q, &k, &v, self.heads, m)?;
        let a = self.attn_out.forward(tape, p, &a)?;
        // The residual adds fold into the norms and the MLP runs as one op,
        // as in CLIP's layers (post-LN keeps only the normalised sum).
        let (_, h) = self.attn_ln.forward_add(tape, p, x, &a)?;
        let inter = (&p[self.inter.w], self.inter.b.map(|b| &p[b]));
        let out = (&p[self.out.w], self.out.b.map(|b| &p[b]));
        let o = mlp(tape, &h, inter, out, self.act)?;
        let (_, y) = self.out_ln.forward_add(tape, p, &h, &o)?;
        Ok(y)
    }
}

pub struct RobertaTower {
    pub cfg: RobertaConfig,
    word: usize,
    pos: usize,
    token_type: usize,
    emb_ln: LayerNorm,
    layers: Vec<RobertaLayer>,
    pooler: Linear,
    /// Recompute each encoder layer's activations in the backward.
    pub gradient_checkpointing: bool,
}

/// transformers' create_position_ids_from_input_ids: padding tokens keep
/// padding_idx, the others count up from padding_idx + 1.
pub fn position_ids(ids: &[u32], batch: usize, len: usize, pad: u32) -> Vec<u32> {
    let mut out = vec![pad; ids.len()];
    for b in 0..batch {
        let mut n = 0;
        for t in 0..len {
            if ids[b * len + t] != pad {
                n += 1;
                out[b * len + t] = pad + n;
            }
        }
    }
    out
}

impl RobertaTower {
    pub fn new(l: &mut Layout, prefix: &str, cfg: &RobertaConfig) -> Result<RobertaTower> {
        let d = cfg.hidden_size;
        let eps = cfg.layer_norm_eps;
        let act = Act::from_hf(&cfg.hidden_act)?;
        let e = format!("{prefix}.embeddings");
        Ok(RobertaTower {
            word: l.add(format!("{e}.word_embeddings.weight"), &[cfg.vocab_size, d]),
            pos: l.add(
                format!("{e}.position_embeddings.weight"),
                &[cfg.max_position_embeddings, d],
            ),
            token_type: l.add(
                format!("{e}.token_type_embeddings.weight"),
                &[cfg.type_vocab_size, d],
            ),
            emb_ln: LayerNorm::new(l, &format!("{e}.LayerNorm"), d, eps),
            layers: (0..cfg.num_hidden_layers)
                .map(|i| {
                    let p = format!("{prefix}.encoder.layer.{i}");
                    RobertaLayer {
                        q: Linear::new(l, &format!("{p}.attention.self.query"), d, d, true),
                        k: Linear::new(l, &format!("{p}.attention.self.key"), d, d, true),
                        v: Linear::new(l, &format!("{p}.attention.self.value"), d, d, true),
                        attn_out: Linear::new(
                            l,
                            &format!("{p}.attention.output.dense"),
                            d,
                            d,
                            true,
                        ),
                        attn_ln: LayerNorm::new(
                            l,
                            &format!("{p}.attention.output.LayerNorm"),
                            d,
                            eps,
                        ),
                        inter: Linear::new(
                            l,
                            &format!("{p}.intermediate.dense"),
                            d,
                            cfg.intermediate_size,
                            true,
                        ),
                        out: Linear::new(
                            l,
                            &format!("{p}.output.dense"),
                            cfg.intermediate_size,
                            d,
                            true,
                        ),
                        out_ln: LayerNorm::new(l, &format!("{p}.output.LayerNorm"), d, eps),
                        heads: cfg.num_attention_heads,
                        act,
                    }
                })
                .collect(),
            pooler: Linear::new(l, &format!("{prefix}.pooler.dense"), d, d, true),
            cfg: cfg.clone(),
            gradient_checkpointing: false,
        })
    }

    /// How many positions of mask [B, T] the tower runs: through the last
    /// attended one, rounded up to a multiple of 8 (all T with
    /// `full_text`, the settings' `CLIP_WGPU_FULL_TEXT=1`).
    pub fn run_len(mask: &[f32], batch: usize, full_text: bool) -> usize {
        let len = mask.len() / batch.max(1);
        if full_text {
            return len;
        }
        let keep = (0..len)
            .rev()
            .find(|&t| (0..batch).any(|b| mask[b * len + t] != 0.0))
            .map_or(len, |t| t + 1);
        super::clip_text::run_bucket(keep, len)
    }

    /// ids and mask [B, T] (host) -> pooled [B, D].
    pub fn forward(
        &self,
        tape: &mut Tape,
        p: &ParamVars,
        ids: &[u32],
        mask: &[f32],
        batch: usize,
    ) -> Result<Var> {
        let c = &self.cfg;
        let len = ids.len() / batch.max(1);
        let pos_ids = position_ids(ids, batch, len, c.pad_token_id);
        if let Some(&m) = pos_ids.iter().max() {
            ensure!(
                (m as usize) < c.max_position_embeddings,
                "text length {len} needs position {m}, beyond max_position_embeddings {}",
                c.max_position_embeddings
            );
        }
        // Positions after every row's last attended token are masked keys
        // and their outputs unused (pooled at the first token): run only the
        // prefix up to the last one (same outputs and gradients).
        let full_text = p[self.word].tensor().gpu().settings().full_text;
        let keep = Self::run_len(mask, batch, full_text);
        let (ids, mask, pos_ids) = (
            &keep_prefix(ids, batch, len, keep)[..],
            &keep_prefix(mask, batch, len, keep)[..],
            keep_prefix(&pos_ids, batch, len, keep),
        );
        let len = keep;
        let w = embedding(tape, &p[self.word], ids, &[batch, len])?;
        let pe = embedding(tape, &p[self.pos], &pos_ids, &[batch, len])?;
        let tt = embedding(tape, &p[self.token_type], &[0], &[1])?;
        let x = add_var(tape, &w, &pe)?;
        let x = add_var(tape, &x, &tt)?;
        let mut x = self.emb_ln.forward(tape, p, &x)?;
        let gpu = p[self.word].tensor().gpu();
        let m = Mask {
            causal: false,
            key_valid: Some(Tensor::from_slice(gpu, mask, &[batch, len])?),
            keys: None,
        };
        for layer in &self.layers {
            x = layer.forward_ckpt(tape, p, &x, &m, self.gradient_checkpointing)?;
        }
        let first: Vec<u32> = (0..batch).map(|b| (b * len) as u32).collect();
        let h0 = embedding(tape, &x, &first, &[batch])?;
        let pooled = self.pooler.forward(tape, p, &h0)?;
        act(tape, &pooled, Act::Tanh)
    }
}

//! CLIP text tower (CLIPTextTransformer): token + position embeddings,
//! pre-LN encoder with causal and padding masks, `final_layer_norm`, pooled
//! at the end-of-text token.

use super::config::ClipTextConfig;
use super::layers::{ClipEncoderLayer, LayerNorm};
use super::params::{Layout, ParamVars};
use super::recompute::EncoderLayer;
use crate::ops::activation::Act;
use crate::ops::elementwise::add_var;
use crate::ops::embedding::embedding;
use crate::ops::softmax::Mask;
use crate::tape::{Tape, Var};
use crate::tensor::Tensor;
use anyhow::{ensure, Result};

pub struct ClipTextTower {
    pub cfg: ClipTextConfig,
    tok: usize,
    pos: usize,
    layers: Vec<ClipEncoderLayer>,
    final_ln: LayerNorm,
    /// Recompute each encoder layer's activations in the backward.
    pub gradient_checkpointing: bool,
}

/// The token whose hidden state is pooled, per transformers: with the legacy
/// `eos_token_id == 2` the position of the largest id, else the first
/// position holding `eos_token_id` (0 when there is none).
pub fn pooled_positions(ids: &[u32], batch: usize, len: usize, eos: u32) -> Vec<usize> {
    (0..batch)
        .map(|b| {
            let row = &ids[b * len..(b + 1) * len];
            if eos == 2 {
                // argmax: first maximal position.
                let mut best = 0;
                for (i, &v) in row.iter().enumerate() {
                    if v > row[best] {
                        best = i;
                    }
                }
                best
            } else {
                row.iter().position(|&v| v == eos).unwrap_or(0)
            }
        })
        .collect()
}

/// The first `keep` positions of each row of a [batch, len] host array.
pub(crate) fn keep_prefix<T: Copy>(x: &[T], batch: usize, len: usize, keep: usize) -> Vec<T> {
    (0..batch)
        .flat_map(|b| x[b * len..b * len + keep].iter().copied())
        .collect()
}

/// Positions run for `pooled` tokens of rows of `len`: through the last
/// (all with `full_text`).
fn keep_len(pooled: &[usize], len: usize, full_text: bool) -> usize {
    match pooled.iter().max() {
        Some(&m) if !full_text => run_bucket(m + 1, len),
        _ => len,
    }
}

/// Positions run for a batch that needs `keep` of `len`: rounded up to a
/// multiple of 8, so that captions of varied lengths make at most len / 8
/// working sets (the buffer pool keeps each size it has seen) instead of
/// one per length. The positions added change nothing (causal attention,
/// masked keys; their outputs are not used).
pub(crate) fn run_bucket(keep: usize, len: usize) -> usize {
    (keep.div_ceil(8) * 8).min(len)
}

impl ClipTextTower {
    pub fn new(l: &mut Layout, prefix: &str, cfg: &ClipTextConfig) -> Result<ClipTextTower> {
        let d = cfg.hidden_size;
        let act = Act::from_hf(&cfg.hidden_act)?;
        let e = format!("{prefix}.embeddings");
        Ok(ClipTextTower {
            tok: l.add(format!("{e}.token_embedding.weight"), &[cfg.vocab_size, d]),
            pos: l.add(
                format!("{e}.position_embedding.weight"),
                &[cfg.max_position_embeddings, d],
            ),
            layers: (0..cfg.num_hidden_layers)
                .map(|i| {
                    ClipEncoderLayer::new(
                        l,
                        &format!("{prefix}.encoder.layers.{i}"),
                        d,
                        cfg.intermediate_size,
                        cfg.num_attention_heads,
                        cfg.layer_norm_eps,
                        act,
                    )
                })
                .collect(),
            final_ln: LayerNorm::new(
                l,
                &format!("{prefix}.final_layer_norm"),
                d,
                cfg.layer_norm_eps,
            ),
            cfg: cfg.clone(),
            gradient_checkpointing: false,
        })
    }

    /// How many positions of ids [B, T] the tower runs: through the last
    /// pooled token, rounded up to a multiple of 8 (all T with `full_text`,
    /// the settings' `CLIP_WGPU_FULL_TEXT=1`).
    pub fn run_len(&self, ids: &[u32], batch: usize, full_text: bool) -> usize {
        let len = ids.len() / batch.max(1);
        keep_len(
            &pooled_positions(ids, batch, len, self.cfg.eos_token_id),
            len,
            full_text,
        )
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
        self.forward_with(tape, p, ids, mask, batch, false)
    }

    /// `forward`; with `pooled_only` the last layer computes the pooled
    /// tokens alone past its attention (inference; see the vision tower's).
    pub fn forward_with(
        &self,
        tape: &mut Tape,
        p: &ParamVars,
        ids: &[u32],
        mask: &[f32],
        batch: usize,
        pooled_only: bool,
    ) -> Result<Var> {
        let c = &self.cfg;
        let len = ids.len() / batch.max(1);
        ensure!(
            len <= c.max_position_embeddings,
            "text length {len} exceeds max_position_embeddings {}",
            c.max_position_embeddings
        );
        // Attention is causal, so positions after the last pooled token feed
        // nothing the output depends on: run only the prefix up to it (the
        // same pooled states and gradients; less work on padded batches).
        let pooled = pooled_positions(ids, batch, len, c.eos_token_id);
        let full_text = p[self.tok].tensor().gpu().settings().full_text;
        let keep = keep_len(&pooled, len, full_text);
        let (ids, mask) = (
            &keep_prefix(ids, batch, len, keep)[..],
            &keep_prefix(mask, batch, len, keep)[..],
        );
        let len = keep;
        let tok = embedding(tape, &p[self.tok], ids, &[batch, len])?;
        let positions: Vec<u32> = (0..len as u32).collect();
        let pos = embedding(tape, &p[self.pos], &positions, &[len])?;
        let mut x = add_var(tape, &tok, &pos)?;
        let gpu = p[self.tok].tensor().gpu();
        let m = Mask {
            causal: true,
            key_valid: Some(Tensor::from_slice(gpu, mask, &[batch, len])?),
            keys: None,
        };
        let rows: Vec<u32> = pooled
            .into_iter()
            .enumerate()
            .map(|(b, t)| (b * len + t) as u32)
            .collect();
        let n = self.layers.len();
        for (i, layer) in self.layers.iter().enumerate() {
            if pooled_only && i + 1 == n {
                let pooled = layer.forward_rows(tape, p, &x, &m, &rows)?;
                return self.final_ln.forward(tape, p, &pooled);
            }
            x = layer.forward_ckpt(tape, p, &x, &m, self.gradient_checkpointing)?;
        }
        x = self.final_ln.forward(tape, p, &x)?;
        embedding(tape, &x, &rows, &[batch])
    }
}

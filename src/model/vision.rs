//! CLIP vision tower (CLIPVisionTransformer): patch conv without bias, class
//! token, learned positions, `pre_layrnorm`, pre-LN encoder, pooled token 0
//! through `post_layernorm`.

use super::config::VisionConfig;
use super::layers::{ClipEncoderLayer, LayerNorm};
use super::params::{Layout, ParamVars};
use super::recompute::EncoderLayer;
use crate::ops::activation::Act;
use crate::ops::embedding::{class_pos, embedding};
use crate::ops::patch::patch_embed;
use crate::ops::softmax::Mask;
use crate::tape::{Tape, Var};
use anyhow::{ensure, Result};

pub struct VisionTower {
    pub cfg: VisionConfig,
    patch: usize,
    class: usize,
    pos: usize,
    pre_ln: LayerNorm,
    layers: Vec<ClipEncoderLayer>,
    post_ln: LayerNorm,
    /// Recompute each encoder layer's activations in the backward.
    pub gradient_checkpointing: bool,
}

impl VisionTower {
    /// `prefix` is `vision_model` in both CLIPModel and (transformers 5)
    /// VisionTextDualEncoderModel.
    pub fn new(l: &mut Layout, prefix: &str, cfg: &VisionConfig) -> Result<VisionTower> {
        let d = cfg.hidden_size;
        let p = cfg.patch_size;
        let n = (cfg.image_size / p).pow(2) + 1;
        let act = Act::from_hf(&cfg.hidden_act)?;
        let e = format!("{prefix}.embeddings");
        Ok(VisionTower {
            class: l.add(format!("{e}.class_embedding"), &[d]),
            patch: l.add(
                format!("{e}.patch_embedding.weight"),
                &[d, cfg.num_channels, p, p],
            ),
            pos: l.add(format!("{e}.position_embedding.weight"), &[n, d]),
            pre_ln: LayerNorm::new(l, &format!("{prefix}.pre_layrnorm"), d, cfg.layer_norm_eps),
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
            post_ln: LayerNorm::new(
                l,
                &format!("{prefix}.post_layernorm"),
                d,
                cfg.layer_norm_eps,
            ),
            cfg: cfg.clone(),
            gradient_checkpointing: false,
        })
    }

    /// pixels [B, C, S, S] -> pooled [B, D].
    pub fn forward(&self, tape: &mut Tape, p: &ParamVars, pixels: &Var) -> Result<Var> {
        self.forward_with(tape, p, pixels, false)
    }

    /// `forward`; with `pooled_only` the last layer computes token 0 alone
    /// past its attention ([`ClipEncoderLayer::forward_rows`]): inference
    /// (embeddings), not training, whose passes must round alike.
    pub fn forward_with(
        &self,
        tape: &mut Tape,
        p: &ParamVars,
        pixels: &Var,
        pooled_only: bool,
    ) -> Result<Var> {
        let s = pixels.shape();
        let c = &self.cfg;
        ensure!(
            s.len() == 4 && s[1] == c.num_channels && s[2] == c.image_size && s[3] == c.image_size,
            "pixel_values {:?} do not match the vision config ({} channels, {} px)",
            s,
            c.num_channels,
            c.image_size
        );
        let b = s[0];
        let x = patch_embed(tape, pixels, &p[self.patch], c.patch_size)?;
        let mut x = class_pos(tape, &x, &p[self.class], &p[self.pos])?;
        x = self.pre_ln.forward(tape, p, &x)?;
        let none = Mask {
            causal: false,
            key_valid: None,
            keys: None,
        };
        // Token 0 of each image: rows b*T of the hidden states viewed [B*T, D].
        let t = x.shape()[1];
        let first: Vec<u32> = (0..b).map(|i| (i * t) as u32).collect();
        let n = self.layers.len();
        for (i, layer) in self.layers.iter().enumerate() {
            if pooled_only && i + 1 == n {
                let pooled = layer.forward_rows(tape, p, &x, &none, &first)?;
                return self.post_ln.forward(tape, p, &pooled);
            }
            x = layer.forward_ckpt(tape, p, &x, &none, self.gradient_checkpointing)?;
        }
        let pooled = embedding(tape, &x, &first, &[b])?;
        self.post_ln.forward(tape, p, &pooled)
    }
}

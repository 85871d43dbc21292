//! The whole model: a CLIP vision tower, a CLIP or RoBERTa text tower, the
//! two projections and `logit_scale`, with Hugging Face tensor names, as
//! CLIPModel and VisionTextDualEncoderModel lay them out.

use super::clip_text::ClipTextTower;
use super::config::{ModelConfig, TextConfig};
use super::layers::Linear;
use super::params::{Layout, ParamStore, ParamVars};
use super::roberta::RobertaTower;
use super::vision::VisionTower;
use super::weights::{save_file, write_atomic, Weights};
use crate::ops::l2norm::l2_normalize;
use crate::ops::loss::clip_loss;
use crate::precision::Precision;
use crate::tape::{Tape, Var};
use crate::tensor::Tensor;
use crate::Gpu;
use anyhow::{ensure, Context, Result};
use std::path::Path;
use std::sync::Arc;

pub enum TextTower {
    Clip(ClipTextTower),
    Roberta(RobertaTower),
}

pub struct ClipModel {
    pub config: ModelConfig,
    pub params: ParamStore,
    pub vision: VisionTower,
    pub text: TextTower,
    visual_projection: Linear,
    text_projection: Linear,
    pub logit_scale: usize,
    /// What its tapes compute at (`--fp16`, `--bf16`; f32 by default).
    pub precision: Precision,
}

/// A batch as the model takes it: pixel values on the GPU, token ids and
/// attention mask on the host ([batch, len], row-major).
pub struct Batch {
    pub pixels: Tensor,
    pub ids: Vec<u32>,
    pub mask: Vec<f32>,
    pub batch: usize,
}

impl Batch {
    /// Ids and mask agree with the row count.
    pub fn check(&self) -> Result<()> {
        ensure!(
            self.ids.len() == self.mask.len()
                && self.batch > 0
                && self.ids.len().is_multiple_of(self.batch),
            "batch: {} ids and {} mask values for {} rows",
            self.ids.len(),
            self.mask.len(),
            self.batch
        );
        Ok(())
    }
}

pub struct ClipOutput {
    /// Projected, L2-normalized: [B, E].
    pub image_embeds: Var,
    pub text_embeds: Var,
    /// exp(logit_scale) * T I^T: [B, B] (logits_per_image is its transpose).
    pub logits_per_text: Tensor,
    pub loss: Var,
}

/// The towers' parameter layout for a config (names, shapes, indices).
fn layout(config: &ModelConfig) -> Result<(Layout, VisionTower, TextTower, Linear, Linear, usize)> {
    let mut l = Layout::default();
    // transformers 5 names both model kinds' towers `vision_model.*` and
    // `text_model.*`; older dual-encoder checkpoints nest them once more
    // (`vision_model.vision_model.*`), which `load` renames.
    let vision = VisionTower::new(&mut l, "vision_model", &config.vision)?;
    let text = match &config.text {
        TextConfig::Clip(c) => TextTower::Clip(ClipTextTower::new(&mut l, "text_model", c)?),
        TextConfig::Roberta(c) => TextTower::Roberta(RobertaTower::new(&mut l, "text_model", c)?),
    };
    let e = config.projection_dim;
    let vp = Linear::new(
        &mut l,
        "visual_projection",
        config.vision.hidden_size,
        e,
        false,
    );
    let tp = Linear::new(
        &mut l,
        "text_projection",
        config.text.hidden_size(),
        e,
        false,
    );
    let ls = l.add("logit_scale", &[1]);
    Ok((l, vision, text, vp, tp, ls))
}

/// Checkpoints saved by transformers 4 from a VisionTextDualEncoderModel
/// hold `vision_model.vision_model.*` (and `text_model.text_model.*` for a
/// CLIP text tower): strip the repeated prefix.
fn legacy_names(w: &Weights) -> Option<Weights> {
    let nested = |k: &str| {
        k.starts_with("vision_model.vision_model.") || k.starts_with("text_model.text_model.")
    };
    if !w.tensors.keys().any(|k| nested(k)) {
        return None;
    }
    let strip = |k: &String| {
        if nested(k) {
            k.split_once('.')
                .map(|(_, rest)| rest.to_string())
                .unwrap_or_default()
        } else {
            k.clone()
        }
    };
    Some(Weights {
        tensors: w
            .tensors
            .iter()
            .map(|(k, v)| (strip(k), v.clone()))
            .collect(),
        ints: w.ints.iter().map(|(k, v)| (strip(k), v.clone())).collect(),
    })
}

impl ClipModel {
    /// Load a Hugging Face model folder (config.json + safetensors).
    pub fn load(gpu: &Arc<Gpu>, dir: &Path) -> Result<ClipModel> {
        ensure!(
            dir.is_dir(),
            "model folder {} does not exist",
            dir.display()
        );
        let config = ModelConfig::from_file(&dir.join("config.json"))?;
        let weights = Weights::load_dir(dir)?;
        Self::from_weights(gpu, config, &weights, &dir.display().to_string())
    }

    pub fn from_weights(
        gpu: &Arc<Gpu>,
        config: ModelConfig,
        weights: &Weights,
        what: &str,
    ) -> Result<ClipModel> {
        let (l, vision, text, visual_projection, text_projection, logit_scale) = layout(&config)?;
        let renamed = legacy_names(weights);
        let weights = renamed.as_ref().unwrap_or(weights);
        let params = ParamStore::from_weights(gpu, &l, weights, &format!("weights in {what}"))?;
        Ok(ClipModel {
            config,
            params,
            vision,
            text,
            visual_projection,
            text_projection,
            logit_scale,
            precision: Precision::F32,
        })
    }

    /// A tape recording at the model's precision.
    pub fn tape(&self) -> Tape {
        Tape::new().with_precision(self.precision)
    }

    /// A tape that records nothing (evaluation), at the model's precision.
    pub fn no_grad_tape(&self) -> Tape {
        Tape::no_grad().with_precision(self.precision)
    }

    /// Names and shapes the config implies, in layout order.
    pub fn expected_tensors(config: &ModelConfig) -> Result<Vec<(String, Vec<usize>)>> {
        Ok(layout(config)?.0.specs)
    }

    /// Freeze a tower: its parameters get no gradient (the projections and
    /// logit_scale still train, as in run_clip.py).
    pub fn freeze(&mut self, vision: bool, text: bool) {
        for p in &mut self.params.params {
            let is_vision = p.name.starts_with("vision_model.");
            let is_text = p.name.starts_with("text_model.");
            p.trainable = !((vision && is_vision) || (text && is_text));
        }
    }

    /// Turn gradient checkpointing on or off in both towers (transformers'
    /// `gradient_checkpointing_enable`): each encoder layer keeps only its
    /// input and recomputes its activations in the backward.
    pub fn gradient_checkpointing(&self) -> bool {
        self.vision.gradient_checkpointing
    }

    pub fn set_gradient_checkpointing(&mut self, on: bool) {
        self.vision.gradient_checkpointing = on;
        match &mut self.text {
            TextTower::Clip(t) => t.gradient_checkpointing = on,
            TextTower::Roberta(t) => t.gradient_checkpointing = on,
        }
    }

    /// Whether no parameter of the tower under `prefix` (`vision_model.` or
    /// `text_model.`) trains.
    pub fn tower_frozen(&self, prefix: &str) -> bool {
        self.params
            .params
            .iter()
            .filter(|p| p.name.starts_with(prefix))
            .all(|p| !p.trainable)
    }

    /// The vision tower's pooled output [B, D] (before the projection).
    pub fn image_pooled(&self, tape: &mut Tape, p: &ParamVars, pixels: &Tensor) -> Result<Var> {
        self.vision.forward(tape, p, &Var::constant(pixels.clone()))
    }

    /// The text tower's pooled output [B, D] (before the projection).
    pub fn text_pooled(
        &self,
        tape: &mut Tape,
        p: &ParamVars,
        ids: &[u32],
        mask: &[f32],
        batch: usize,
    ) -> Result<Var> {
        match &self.text {
            TextTower::Clip(t) => t.forward(tape, p, ids, mask, batch),
            TextTower::Roberta(t) => t.forward(tape, p, ids, mask, batch),
        }
    }

    /// L2-normalised image embeddings from the vision tower's pooled output.
    pub fn image_embeds(&self, tape: &mut Tape, p: &ParamVars, pooled: &Var) -> Result<Var> {
        let f = self.visual_projection.forward(tape, p, pooled)?;
        l2_normalize(tape, &f)
    }

    /// L2-normalised text embeddings from the text tower's pooled output.
    pub fn text_embeds(&self, tape: &mut Tape, p: &ParamVars, pooled: &Var) -> Result<Var> {
        let f = self.text_projection.forward(tape, p, pooled)?;
        l2_normalize(tape, &f)
    }

    pub fn image_features(&self, tape: &mut Tape, p: &ParamVars, pixels: &Tensor) -> Result<Var> {
        let pooled = self.image_pooled(tape, p, pixels)?;
        self.visual_projection.forward(tape, p, &pooled)
    }

    pub fn text_features(
        &self,
        tape: &mut Tape,
        p: &ParamVars,
        ids: &[u32],
        mask: &[f32],
        batch: usize,
    ) -> Result<Var> {
        let pooled = self.text_pooled(tape, p, ids, mask, batch)?;
        self.text_projection.forward(tape, p, &pooled)
    }

    /// How many of the batch's text positions the text tower runs (see the
    /// towers' `run_len`).
    pub fn text_run_len(&self, b: &Batch) -> usize {
        let full_text = b.pixels.gpu().settings().full_text;
        match &self.text {
            TextTower::Clip(t) => t.run_len(&b.ids, b.batch, full_text),
            TextTower::Roberta(_) => RobertaTower::run_len(&b.mask, b.batch, full_text),
        }
    }

    /// Both towers' L2-normalised embeddings of a batch, [B, E] each.
    pub fn embeds(&self, tape: &mut Tape, p: &ParamVars, b: &Batch) -> Result<(Var, Var)> {
        b.check()?;
        let img = self.image_pooled(tape, p, &b.pixels)?;
        let img = self.image_embeds(tape, p, &img)?;
        let txt = self.text_pooled(tape, p, &b.ids, &b.mask, b.batch)?;
        let txt = self.text_embeds(tape, p, &txt)?;
        Ok((img, txt))
    }

    /// L2-normalised image embeddings [B, E] of preprocessed pixels
    /// [B, 3, S, S], with no gradient (evaluation, `embed`, `search`). The
    /// last encoder layer computes the pooled token alone past its
    /// attention, a fifth less work than `forward` for the same values
    /// (up to rounding).
    pub fn embed_images(&self, pixels: &Tensor) -> Result<Tensor> {
        let mut tape = self.no_grad_tape();
        let p = self.params.vars(&mut tape);
        let pooled =
            self.vision
                .forward_with(&mut tape, &p, &Var::constant(pixels.clone()), true)?;
        Ok(self.image_embeds(&mut tape, &p, &pooled)?.tensor().clone())
    }

    /// L2-normalised text embeddings [B, E] of token ids and attention mask
    /// ([B, len], row-major), with no gradient; a CLIP text tower's last
    /// layer computes the pooled (end-of-text) tokens alone past its
    /// attention, as `embed_images` does.
    pub fn embed_texts(&self, ids: &[u32], mask: &[f32], batch: usize) -> Result<Tensor> {
        let mut tape = self.no_grad_tape();
        let p = self.params.vars(&mut tape);
        let pooled = match &self.text {
            TextTower::Clip(t) => t.forward_with(&mut tape, &p, ids, mask, batch, true)?,
            TextTower::Roberta(t) => t.forward(&mut tape, &p, ids, mask, batch)?,
        };
        Ok(self.text_embeds(&mut tape, &p, &pooled)?.tensor().clone())
    }

    /// The log-space logit scale, [1] on the GPU.
    pub fn logit_scale_tensor(&self) -> &Tensor {
        &self.params.params[self.logit_scale].tensor
    }

    /// Embeddings, logits and the symmetric contrastive loss.
    pub fn forward(&self, tape: &mut Tape, p: &ParamVars, b: &Batch) -> Result<ClipOutput> {
        let (image_embeds, text_embeds) = self.embeds(tape, p, b)?;
        let out = clip_loss(tape, &image_embeds, &text_embeds, &p[self.logit_scale])?;
        Ok(ClipOutput {
            image_embeds,
            text_embeds,
            logits_per_text: out.logits_per_text,
            loss: out.loss,
        })
    }

    /// Write `model.safetensors` and `config.json` into `dir` (created if
    /// needed) with the names and layout transformers' from_pretrained loads.
    pub fn save(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let mut tensors = self.params.to_host()?;
        for (name, t) in &mut tensors {
            if name == "logit_scale" {
                t.shape.clear(); // a 0-d parameter in PyTorch
            }
        }
        save_file(&dir.join("model.safetensors"), &tensors)?;
        let json = serde_json::to_string_pretty(&self.config.raw)?;
        write_atomic(&dir.join("config.json"), json.as_bytes())
    }
}

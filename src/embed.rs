//! `clip-wgpu embed`: image and text embeddings of a model folder, with the
//! meaning of transformers' `get_image_features` / `get_text_features` after
//! L2 normalization, and `logits_per_image` as CLIPModel returns it.

use crate::data::{load_image, preprocess, ImageProcessorConfig, TextTokenizer};
use crate::model::clip::ClipModel;
use crate::ops::l2norm::l2_normalize;
use crate::tape::Tape;
use crate::tensor::Tensor;
use crate::Gpu;
use anyhow::{ensure, Context, Result};
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub struct Embeddings {
    pub image_embeds: Vec<Vec<f32>>,
    pub text_embeds: Vec<Vec<f32>>,
    /// exp(logit_scale) * image . text, [images][texts] (empty unless both).
    pub logits_per_image: Vec<Vec<f32>>,
}

fn rows(t: &Tensor) -> Result<Vec<Vec<f32>>> {
    let c = t.cols();
    Ok(t.to_vec()?.chunks(c).map(|r| r.to_vec()).collect())
}

/// Embed `images` (paths) and `texts` with the model in `dir`, its own
/// processor settings, and text padded to the model's maximum length.
pub fn embed(
    gpu: &Arc<Gpu>,
    dir: &Path,
    images: &[PathBuf],
    texts: &[String],
) -> Result<Embeddings> {
    let model = ClipModel::load(gpu, dir)?;
    let mut tape = Tape::no_grad();
    let vars = model.params.vars(&mut tape);
    let mut out = Embeddings {
        image_embeds: Vec::new(),
        text_embeds: Vec::new(),
        logits_per_image: Vec::new(),
    };
    if !images.is_empty() {
        let cfg = ImageProcessorConfig::from_model_dir(dir)?;
        let s = model.config.vision.image_size;
        ensure!(
            cfg.crop_h == s && cfg.crop_w == s,
            "{}: the processor crops to {}x{} but the model takes {s}x{s} images",
            dir.display(),
            cfg.crop_h,
            cfg.crop_w
        );
        let mut px = Vec::with_capacity(images.len() * 3 * s * s);
        for p in images {
            let img = load_image(p)?;
            px.extend(
                preprocess(&img, &cfg).with_context(|| format!("preprocessing {}", p.display()))?,
            );
        }
        let px = Tensor::from_slice(gpu, &px, &[images.len(), 3, s, s])?;
        let f = model.image_features(&mut tape, &vars, &px)?;
        out.image_embeds = rows(l2_normalize(&mut tape, &f)?.tensor())?;
    }
    if !texts.is_empty() {
        let tok = TextTokenizer::from_model_dir(dir)?;
        let len = model.config.text.max_positions();
        let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
        let (ids, mask) = tok.encode_batch(&refs, len)?;
        let f = model.text_features(&mut tape, &vars, &ids, &mask, texts.len())?;
        out.text_embeds = rows(l2_normalize(&mut tape, &f)?.tensor())?;
    }
    if !images.is_empty() && !texts.is_empty() {
        let scale = model.params.params[model.logit_scale].tensor.to_vec()?[0].exp();
        out.logits_per_image = out
            .image_embeds
            .iter()
            .map(|i| {
                out.text_embeds
                    .iter()
                    .map(|t| scale * i.iter().zip(t).map(|(a, b)| a * b).sum::<f32>())
                    .collect()
            })
            .collect();
    }
    Ok(out)
}

impl Embeddings {
    pub fn to_json(&self) -> String {
        serde_json::json!({
            "image_embeds": self.image_embeds,
            "text_embeds": self.text_embeds,
            "logits_per_image": self.logits_per_image,
        })
        .to_string()
    }
}

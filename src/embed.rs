//! `clip-wgpu embed`: image and text embeddings of a model folder, with the
//! meaning of transformers' `get_image_features` / `get_text_features` after
//! L2 normalization, and `logits_per_image` as CLIPModel returns it.
//!
//! [`Embedder`] is the reusable part: a model folder loaded with its image
//! processor and tokenizer, embedding a batch of pictures or texts at a
//! time (`embed`, `search`, `zero-shot` use it). Whole collections
//! (`embed --images DIR` / `--texts FILE`) are in [`crate::index`].

use crate::data::{load_image, preprocess, ImageProcessorConfig, TextTokenizer};
use crate::model::clip::ClipModel;
use crate::tensor::Tensor;
use crate::Gpu;
use anyhow::{Context, Result};
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

/// A model folder ready to embed: the model, its image processor and its
/// tokenizer (each read when first needed, so a folder without a tokenizer
/// still embeds pictures). Embeddings are L2-normalised rows of `dim()`
/// values.
pub struct Embedder {
    pub model: ClipModel,
    /// Texts are padded to (and cut at) this many tokens: the model's
    /// maximum length.
    pub max_len: usize,
    pub dir: PathBuf,
    processor: OnceLock<std::result::Result<ImageProcessorConfig, String>>,
    tokenizer: OnceLock<std::result::Result<Arc<TextTokenizer>, String>>,
}

impl Embedder {
    /// Load the model in `dir` (config.json and weights).
    pub fn load(gpu: &Arc<Gpu>, dir: &Path) -> Result<Embedder> {
        let model = ClipModel::load(gpu, dir)?;
        let max_len = model.config.text.max_positions();
        Ok(Embedder {
            model,
            max_len,
            dir: dir.to_path_buf(),
            processor: OnceLock::new(),
            tokenizer: OnceLock::new(),
        })
    }

    /// The folder's image processor (processor_config.json or
    /// preprocessor_config.json), checked against the model's image size.
    pub fn processor(&self) -> Result<&ImageProcessorConfig> {
        let r = self.processor.get_or_init(|| {
            let p =
                ImageProcessorConfig::from_model_dir(&self.dir).map_err(|e| format!("{e:#}"))?;
            let s = self.image_size();
            if p.crop_h != s || p.crop_w != s {
                return Err(format!(
                    "{}: the processor crops to {}x{} but the model takes {s}x{s} images",
                    self.dir.display(),
                    p.crop_h,
                    p.crop_w
                ));
            }
            Ok(p)
        });
        r.as_ref().map_err(|e| anyhow::anyhow!("{e}"))
    }

    /// The folder's tokenizer (tokenizer.json).
    pub fn tokenizer(&self) -> Result<&Arc<TextTokenizer>> {
        let r = self.tokenizer.get_or_init(|| {
            TextTokenizer::from_model_dir(&self.dir)
                .map(Arc::new)
                .map_err(|e| format!("{e:#}"))
        });
        r.as_ref().map_err(|e| anyhow::anyhow!("{e}"))
    }

    pub fn gpu(&self) -> &Arc<Gpu> {
        self.model.params.params[0].tensor.gpu()
    }

    /// Values per embedding (the projection width).
    pub fn dim(&self) -> usize {
        self.model.config.projection_dim
    }

    /// Side of the square pictures the model takes.
    pub fn image_size(&self) -> usize {
        self.model.config.vision.image_size
    }

    /// exp(logit_scale): CLIP's logits are this times the cosine similarity.
    pub fn logit_scale(&self) -> Result<f32> {
        Ok(self.model.logit_scale_tensor().to_vec()?[0].exp())
    }

    /// Embeddings ([n, dim], row-major) of `n` preprocessed pictures
    /// (`pixels`: [n, 3, S, S] as the processor makes them), one batch.
    pub fn embed_pixels(&self, pixels: &[f32], n: usize) -> Result<Vec<f32>> {
        if n == 0 {
            return Ok(Vec::new());
        }
        let s = self.image_size();
        let px = Tensor::from_slice(self.gpu(), pixels, &[n, 3, s, s])?;
        self.model.embed_images(&px)?.to_vec()
    }

    /// Load and preprocess one picture as the model's processor does.
    pub fn pixels(&self, path: &Path) -> Result<Vec<f32>> {
        let img = load_image(path)?;
        preprocess(&img, self.processor()?)
            .with_context(|| format!("preprocessing {}", path.display()))
    }

    /// Embeddings ([paths, dim]) of picture files, one batch; an unreadable
    /// picture is an error.
    pub fn embed_image_files(&self, paths: &[PathBuf]) -> Result<Vec<f32>> {
        let s = self.image_size();
        let mut px = Vec::with_capacity(paths.len() * 3 * s * s);
        for p in paths {
            px.extend(self.pixels(p)?);
        }
        self.embed_pixels(&px, paths.len())
    }

    /// Embeddings ([texts, dim]) of texts, one batch.
    pub fn embed_texts<S: AsRef<str>>(&self, texts: &[S]) -> Result<Vec<f32>> {
        if texts.is_empty() {
            return Ok(Vec::new());
        }
        let refs: Vec<&str> = texts.iter().map(AsRef::as_ref).collect();
        let (ids, mask) = self.tokenizer()?.encode_batch(&refs, self.max_len)?;
        self.model.embed_texts(&ids, &mask, texts.len())?.to_vec()
    }
}

pub struct Embeddings {
    pub image_embeds: Vec<Vec<f32>>,
    pub text_embeds: Vec<Vec<f32>>,
    /// exp(logit_scale) * image . text, [images][texts] (empty unless both).
    pub logits_per_image: Vec<Vec<f32>>,
}

fn rows(v: Vec<f32>, dim: usize) -> Vec<Vec<f32>> {
    v.chunks(dim.max(1)).map(<[f32]>::to_vec).collect()
}

/// Embed `images` (paths) and `texts` with the model in `dir`, its own
/// processor settings, and text padded to the model's maximum length.
pub fn embed(
    gpu: &Arc<Gpu>,
    dir: &Path,
    images: &[PathBuf],
    texts: &[String],
) -> Result<Embeddings> {
    let m = Embedder::load(gpu, dir)?;
    let d = m.dim();
    let mut out = Embeddings {
        image_embeds: rows(m.embed_image_files(images)?, d),
        text_embeds: rows(m.embed_texts(texts)?, d),
        logits_per_image: Vec::new(),
    };
    if !images.is_empty() && !texts.is_empty() {
        let scale = m.logit_scale()?;
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

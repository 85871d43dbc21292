//! Hugging Face `config.json` for CLIPModel and VisionTextDualEncoderModel
//! (CLIP vision tower + RoBERTa text tower). Missing keys take transformers'
//! defaults; present keys of the wrong type are errors naming file and key.
//! Sizes are bounded (see [`MAX_DIM`], [`MAX_LAYERS`], [`MAX_PARAMETERS`]) so
//! that no later shape arithmetic can overflow on a hostile file.

use anyhow::{bail, Context, Result};
use serde_json::{Map, Value};
use std::path::Path;

#[derive(Clone, Debug, PartialEq)]
pub struct VisionConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_channels: usize,
    pub image_size: usize,
    pub patch_size: usize,
    pub hidden_act: String,
    pub layer_norm_eps: f32,
}

#[derive(Clone, Debug, PartialEq)]
pub struct ClipTextConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub max_position_embeddings: usize,
    pub hidden_act: String,
    pub layer_norm_eps: f32,
    pub pad_token_id: u32,
    pub bos_token_id: u32,
    pub eos_token_id: u32,
}

#[derive(Clone, Debug, PartialEq)]
pub struct RobertaConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub max_position_embeddings: usize,
    pub type_vocab_size: usize,
    pub hidden_act: String,
    pub layer_norm_eps: f32,
    pub pad_token_id: u32,
}

#[derive(Clone, Debug, PartialEq)]
pub enum TextConfig {
    Clip(ClipTextConfig),
    Roberta(RobertaConfig),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ModelKind {
    /// `CLIPModel` (model_type "clip").
    Clip,
    /// `VisionTextDualEncoderModel` (model_type "vision-text-dual-encoder").
    DualEncoder,
}

#[derive(Clone, Debug)]
pub struct ModelConfig {
    pub kind: ModelKind,
    pub vision: VisionConfig,
    pub text: TextConfig,
    pub projection_dim: usize,
    pub logit_scale_init: f32,
    /// The file as read, written back on save so transformers sees its own keys.
    pub raw: Value,
}

/// Largest accepted size (widths, vocabulary, positions, image side): far
/// above any real model, low enough that products of a few sizes fit in 64
/// bits.
pub const MAX_DIM: usize = 1 << 24;
/// Largest accepted `num_hidden_layers`.
pub const MAX_LAYERS: usize = 4096;
/// Largest accepted parameter count (2^34 f32 values = 64 GiB).
pub const MAX_PARAMETERS: u128 = 1 << 34;

/// Typed access to one JSON object, with errors that name where it came from.
struct Obj<'a> {
    map: &'a Map<String, Value>,
    at: String,
}

impl<'a> Obj<'a> {
    fn new(v: &'a Value, at: &str) -> Result<Obj<'a>> {
        match v.as_object() {
            Some(map) => Ok(Obj {
                map,
                at: at.to_string(),
            }),
            None => bail!("{at} must be a JSON object"),
        }
    }

    fn child(&self, key: &str) -> Result<Option<Obj<'a>>> {
        match self.map.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => Obj::new(v, &self.key(key)).map(Some),
        }
    }

    /// Where `key` is, for messages.
    fn key(&self, key: &str) -> String {
        key_path(&self.at, key)
    }

    fn usize(&self, key: &str, default: usize) -> Result<usize> {
        self.bounded(key, default, MAX_DIM)
    }

    /// A positive integer at most `max`.
    fn bounded(&self, key: &str, default: usize, max: usize) -> Result<usize> {
        match self.map.get(key) {
            None | Some(Value::Null) => Ok(default),
            Some(v) => self.positive(key, v, max),
        }
    }

    fn positive(&self, key: &str, v: &Value, max: usize) -> Result<usize> {
        match v.as_u64() {
            Some(n) if n > 0 && n <= max as u64 => Ok(n as usize),
            Some(n) if n > 0 => bail!(
                "{} is {n}, more than clip-wgpu accepts ({max})",
                self.key(key)
            ),
            _ => bail!("{} must be a positive integer, got {v}", self.key(key)),
        }
    }

    fn token(&self, key: &str, default: u32) -> Result<u32> {
        match self.map.get(key) {
            None | Some(Value::Null) => Ok(default),
            // transformers allows a list of eos ids; the first one is the pooled token.
            Some(Value::Array(a)) if !a.is_empty() => self.token_value(key, &a[0]),
            Some(v) => self.token_value(key, v),
        }
    }

    fn token_value(&self, key: &str, v: &Value) -> Result<u32> {
        match v.as_u64() {
            Some(n) if n <= u32::MAX as u64 => Ok(n as u32),
            _ => bail!("{} must be a token id, got {v}", self.key(key)),
        }
    }

    fn f32(&self, key: &str, default: f32) -> Result<f32> {
        match self.map.get(key) {
            None | Some(Value::Null) => Ok(default),
            // Finite as an f32 too (1e300 is a finite f64).
            Some(v) => match v.as_f64().map(|x| x as f32) {
                Some(x) if x.is_finite() => Ok(x),
                _ => bail!("{} must be a (finite f32) number, got {v}", self.key(key)),
            },
        }
    }

    fn string(&self, key: &str, default: &str) -> Result<String> {
        match self.map.get(key) {
            None | Some(Value::Null) => Ok(default.to_string()),
            Some(Value::String(s)) => Ok(s.clone()),
            Some(v) => bail!("{} must be a string, got {v}", self.key(key)),
        }
    }

    /// `image_size`/`patch_size` may be an int or a square [h, w] pair.
    fn square(&self, key: &str, default: usize) -> Result<usize> {
        match self.map.get(key) {
            Some(Value::Array(a)) if a.len() == 2 && a[0] == a[1] => {
                self.positive(key, &a[0], MAX_DIM)
            }
            Some(Value::Array(_)) => bail!("{}: only square sizes are supported", self.key(key)),
            _ => self.usize(key, default),
        }
    }
}

/// `at` + `key` for messages: "file: key" at the top level of a file,
/// "file: a.b" below it.
fn key_path(at: &str, key: &str) -> String {
    if at.contains(": ") {
        format!("{at}.{key}")
    } else {
        format!("{at}: {key}")
    }
}

/// Merge `<name>_dict` (legacy key) over `<name>`, as CLIPConfig does.
fn merged(top: &Obj, name: &str) -> Result<Value> {
    let mut base = match top.child(name)? {
        Some(o) => o.map.clone(),
        None => Map::new(),
    };
    if let Some(legacy) = top.child(&format!("{name}_dict"))? {
        for (k, v) in legacy.map {
            base.insert(k.clone(), v.clone());
        }
    }
    Ok(Value::Object(base))
}

fn check_heads(at: &str, hidden: usize, heads: usize) -> Result<()> {
    if !hidden.is_multiple_of(heads) {
        bail!("{at}: hidden_size {hidden} is not a multiple of num_attention_heads {heads}");
    }
    Ok(())
}

/// The activation and LayerNorm epsilon of a tower, checked here so that the
/// error names the file and key.
fn check_act_eps(at: &str, act: &str, eps: f32) -> Result<()> {
    crate::ops::activation::Act::from_hf(act).with_context(|| key_path(at, "hidden_act"))?;
    if eps < 0.0 {
        bail!("{} must be >= 0, got {eps}", key_path(at, "layer_norm_eps"));
    }
    Ok(())
}

/// Parameters of `layers` transformer layers of width `d` and MLP width `i`
/// (attention q, k, v, o with biases, MLP, two LayerNorms), in u128 so that
/// no bounded input overflows.
fn encoder_params(layers: usize, d: usize, i: usize) -> u128 {
    let (l, d, i) = (layers as u128, d as u128, i as u128);
    l * (4 * d * d + 2 * d * i + 9 * d + i)
}

fn vision(o: &Obj) -> Result<VisionConfig> {
    let c = VisionConfig {
        hidden_size: o.usize("hidden_size", 768)?,
        intermediate_size: o.usize("intermediate_size", 3072)?,
        num_hidden_layers: o.bounded("num_hidden_layers", 12, MAX_LAYERS)?,
        num_attention_heads: o.usize("num_attention_heads", 12)?,
        num_channels: o.usize("num_channels", 3)?,
        image_size: o.square("image_size", 224)?,
        patch_size: o.square("patch_size", 32)?,
        hidden_act: o.string("hidden_act", "quick_gelu")?,
        layer_norm_eps: o.f32("layer_norm_eps", 1e-5)?,
    };
    check_heads(&o.at, c.hidden_size, c.num_attention_heads)?;
    check_act_eps(&o.at, &c.hidden_act, c.layer_norm_eps)?;
    if c.num_channels != 3 {
        bail!(
            "{} is {}: clip-wgpu feeds RGB pictures (3 channels)",
            o.key("num_channels"),
            c.num_channels
        );
    }
    if c.patch_size > c.image_size {
        bail!(
            "{}: patch_size {} is larger than image_size {}",
            o.at,
            c.patch_size,
            c.image_size
        );
    }
    Ok(c)
}

fn clip_text(o: &Obj) -> Result<ClipTextConfig> {
    let c = ClipTextConfig {
        vocab_size: o.usize("vocab_size", 49408)?,
        hidden_size: o.usize("hidden_size", 512)?,
        intermediate_size: o.usize("intermediate_size", 2048)?,
        num_hidden_layers: o.bounded("num_hidden_layers", 12, MAX_LAYERS)?,
        num_attention_heads: o.usize("num_attention_heads", 8)?,
        max_position_embeddings: o.usize("max_position_embeddings", 77)?,
        hidden_act: o.string("hidden_act", "quick_gelu")?,
        layer_norm_eps: o.f32("layer_norm_eps", 1e-5)?,
        pad_token_id: o.token("pad_token_id", 1)?,
        bos_token_id: o.token("bos_token_id", 49406)?,
        eos_token_id: o.token("eos_token_id", 49407)?,
    };
    check_heads(&o.at, c.hidden_size, c.num_attention_heads)?;
    check_act_eps(&o.at, &c.hidden_act, c.layer_norm_eps)?;
    Ok(c)
}

fn roberta(o: &Obj) -> Result<RobertaConfig> {
    let c = RobertaConfig {
        vocab_size: o.usize("vocab_size", 50265)?,
        hidden_size: o.usize("hidden_size", 768)?,
        intermediate_size: o.usize("intermediate_size", 3072)?,
        num_hidden_layers: o.bounded("num_hidden_layers", 12, MAX_LAYERS)?,
        num_attention_heads: o.usize("num_attention_heads", 12)?,
        max_position_embeddings: o.usize("max_position_embeddings", 512)?,
        type_vocab_size: o.usize("type_vocab_size", 2)?,
        hidden_act: o.string("hidden_act", "gelu")?,
        // transformers 5 RobertaConfig defaults (roberta-base itself sets 1e-5 and 514).
        layer_norm_eps: o.f32("layer_norm_eps", 1e-12)?,
        pad_token_id: o.token("pad_token_id", 1)?,
    };
    check_heads(&o.at, c.hidden_size, c.num_attention_heads)?;
    check_act_eps(&o.at, &c.hidden_act, c.layer_norm_eps)?;
    // Positions start after padding_idx (create_position_ids_from_input_ids),
    // so at least one real position must remain.
    if c.max_position_embeddings as u64 <= c.pad_token_id as u64 + 1 {
        bail!(
            "{} {} leaves no position for text: RoBERTa's positions start after \
             pad_token_id {} + 1",
            o.key("max_position_embeddings"),
            c.max_position_embeddings,
            c.pad_token_id
        );
    }
    Ok(c)
}

impl ModelConfig {
    pub fn from_file(path: &Path) -> Result<ModelConfig> {
        if !path.exists() {
            let dir = path.parent().unwrap_or(Path::new("."));
            if path.file_name().is_some_and(|n| n == "config.json") && dir.is_dir() {
                bail!(
                    "{} is not a Hugging Face model folder: it has no config.json",
                    dir.display()
                );
            }
            bail!("model config {} does not exist", path.display());
        }
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading model config {}", path.display()))?;
        let raw: Value = serde_json::from_str(&text)
            .with_context(|| format!("{} is not valid JSON", path.display()))?;
        Self::from_value(raw, &path.display().to_string())
    }

    pub fn from_value(raw: Value, name: &str) -> Result<ModelConfig> {
        let top = Obj::new(&raw, name)?;
        let model_type = top.string("model_type", "")?;
        let (kind, vision, text) = match model_type.as_str() {
            "clip" => {
                let v = merged(&top, "vision_config")?;
                let t = merged(&top, "text_config")?;
                let vision = vision(&Obj::new(&v, &format!("{name}: vision_config"))?)?;
                let text = clip_text(&Obj::new(&t, &format!("{name}: text_config"))?)?;
                (ModelKind::Clip, vision, TextConfig::Clip(text))
            }
            "vision-text-dual-encoder" => {
                let at_v = format!("{name}: vision_config");
                let Some(v) = top.child("vision_config")? else {
                    bail!("{at_v} is missing");
                };
                let vision = match v.string("model_type", "")?.as_str() {
                    "clip_vision_model" => vision(&v)?,
                    // A whole CLIP config: its vision part is the tower.
                    "clip" => {
                        let inner = merged(&v, "vision_config")?;
                        vision(&Obj::new(&inner, &format!("{at_v}.vision_config"))?)?
                    }
                    other => bail!(
                        "{at_v}.model_type {other:?} is not supported: clip-wgpu runs CLIP vision towers \
                         (\"clip_vision_model\" or \"clip\")"
                    ),
                };
                let at_t = format!("{name}: text_config");
                let Some(t) = top.child("text_config")? else {
                    bail!("{at_t} is missing");
                };
                let text = match t.string("model_type", "")?.as_str() {
                    "roberta" => TextConfig::Roberta(roberta(&t)?),
                    "clip_text_model" => TextConfig::Clip(clip_text(&t)?),
                    other => bail!(
                        "{at_t}.model_type {other:?} is not supported: clip-wgpu runs RoBERTa and CLIP \
                         text towers (\"roberta\", \"clip_text_model\")"
                    ),
                };
                (ModelKind::DualEncoder, vision, text)
            }
            "" => bail!("{name} has no \"model_type\": not a Hugging Face model config"),
            other => bail!(
                "{name}: model_type {other:?} is not supported (expected \"clip\" or \
                 \"vision-text-dual-encoder\")"
            ),
        };
        let c = ModelConfig {
            kind,
            vision,
            text,
            projection_dim: top.usize("projection_dim", 512)?,
            logit_scale_init: top.f32("logit_scale_init_value", 2.6592)?,
            raw,
        };
        let n = c.num_parameters();
        if n > MAX_PARAMETERS {
            bail!(
                "{name}: these sizes make a model of about {n} parameters, more than clip-wgpu \
                 supports ({MAX_PARAMETERS})"
            );
        }
        Ok(c)
    }

    /// About how many parameters the model has (the dominant terms; exact
    /// enough for a sanity bound).
    pub fn num_parameters(&self) -> u128 {
        let v = &self.vision;
        let (d, p) = (v.hidden_size as u128, v.patch_size as u128);
        let patches = (v.image_size as u128 / p).pow(2) + 1;
        let vision = d * v.num_channels as u128 * p * p
            + patches * d
            + encoder_params(v.num_hidden_layers, v.hidden_size, v.intermediate_size);
        let text = match &self.text {
            TextConfig::Clip(t) => {
                (t.vocab_size + t.max_position_embeddings) as u128 * t.hidden_size as u128
                    + encoder_params(t.num_hidden_layers, t.hidden_size, t.intermediate_size)
            }
            TextConfig::Roberta(t) => {
                (t.vocab_size + t.max_position_embeddings + t.type_vocab_size) as u128
                    * t.hidden_size as u128
                    + encoder_params(t.num_hidden_layers, t.hidden_size, t.intermediate_size)
            }
        };
        let proj = (v.hidden_size + self.text.hidden_size()) as u128 * self.projection_dim as u128;
        vision + text + proj + 1
    }
}

impl TextConfig {
    pub fn hidden_size(&self) -> usize {
        match self {
            TextConfig::Clip(c) => c.hidden_size,
            TextConfig::Roberta(c) => c.hidden_size,
        }
    }
    pub fn max_positions(&self) -> usize {
        match self {
            TextConfig::Clip(c) => c.max_position_embeddings,
            // RoBERTa's positions start after padding_idx (from_value
            // checks that some remain).
            TextConfig::Roberta(c) => c
                .max_position_embeddings
                .saturating_sub(c.pad_token_id as usize + 1),
        }
    }
}

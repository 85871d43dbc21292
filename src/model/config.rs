//! Hugging Face `config.json` for CLIPModel and VisionTextDualEncoderModel
//! (CLIP vision tower + RoBERTa text tower). Missing keys take transformers'
//! defaults; present keys of the wrong type are errors naming file and key.

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
            Some(v) => Obj::new(v, &format!("{}.{key}", self.at)).map(Some),
        }
    }

    fn usize(&self, key: &str, default: usize) -> Result<usize> {
        match self.map.get(key) {
            None | Some(Value::Null) => Ok(default),
            Some(v) => match v.as_u64() {
                Some(n) if n > 0 => Ok(n as usize),
                _ => bail!("{}.{key} must be a positive integer, got {v}", self.at),
            },
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
            _ => bail!("{}.{key} must be a token id, got {v}", self.at),
        }
    }

    fn f32(&self, key: &str, default: f32) -> Result<f32> {
        match self.map.get(key) {
            None | Some(Value::Null) => Ok(default),
            Some(v) => match v.as_f64() {
                Some(x) if x.is_finite() => Ok(x as f32),
                _ => bail!("{}.{key} must be a number, got {v}", self.at),
            },
        }
    }

    fn string(&self, key: &str, default: &str) -> Result<String> {
        match self.map.get(key) {
            None | Some(Value::Null) => Ok(default.to_string()),
            Some(Value::String(s)) => Ok(s.clone()),
            Some(v) => bail!("{}.{key} must be a string, got {v}", self.at),
        }
    }

    /// `image_size`/`patch_size` may be an int or a square [h, w] pair.
    fn square(&self, key: &str, default: usize) -> Result<usize> {
        match self.map.get(key) {
            Some(Value::Array(a)) if a.len() == 2 && a[0] == a[1] => {
                self.token_value(key, &a[0]).map(|n| n as usize)
            }
            Some(Value::Array(_)) => bail!("{}.{key}: only square sizes are supported", self.at),
            _ => self.usize(key, default),
        }
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

fn vision(o: &Obj) -> Result<VisionConfig> {
    let c = VisionConfig {
        hidden_size: o.usize("hidden_size", 768)?,
        intermediate_size: o.usize("intermediate_size", 3072)?,
        num_hidden_layers: o.usize("num_hidden_layers", 12)?,
        num_attention_heads: o.usize("num_attention_heads", 12)?,
        num_channels: o.usize("num_channels", 3)?,
        image_size: o.square("image_size", 224)?,
        patch_size: o.square("patch_size", 32)?,
        hidden_act: o.string("hidden_act", "quick_gelu")?,
        layer_norm_eps: o.f32("layer_norm_eps", 1e-5)?,
    };
    check_heads(&o.at, c.hidden_size, c.num_attention_heads)?;
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
        num_hidden_layers: o.usize("num_hidden_layers", 12)?,
        num_attention_heads: o.usize("num_attention_heads", 8)?,
        max_position_embeddings: o.usize("max_position_embeddings", 77)?,
        hidden_act: o.string("hidden_act", "quick_gelu")?,
        layer_norm_eps: o.f32("layer_norm_eps", 1e-5)?,
        pad_token_id: o.token("pad_token_id", 1)?,
        bos_token_id: o.token("bos_token_id", 49406)?,
        eos_token_id: o.token("eos_token_id", 49407)?,
    };
    check_heads(&o.at, c.hidden_size, c.num_attention_heads)?;
    Ok(c)
}

fn roberta(o: &Obj) -> Result<RobertaConfig> {
    let c = RobertaConfig {
        vocab_size: o.usize("vocab_size", 50265)?,
        hidden_size: o.usize("hidden_size", 768)?,
        intermediate_size: o.usize("intermediate_size", 3072)?,
        num_hidden_layers: o.usize("num_hidden_layers", 12)?,
        num_attention_heads: o.usize("num_attention_heads", 12)?,
        max_position_embeddings: o.usize("max_position_embeddings", 512)?,
        type_vocab_size: o.usize("type_vocab_size", 2)?,
        hidden_act: o.string("hidden_act", "gelu")?,
        // transformers 5 RobertaConfig defaults (roberta-base itself sets 1e-5 and 514).
        layer_norm_eps: o.f32("layer_norm_eps", 1e-12)?,
        pad_token_id: o.token("pad_token_id", 1)?,
    };
    check_heads(&o.at, c.hidden_size, c.num_attention_heads)?;
    Ok(c)
}

impl ModelConfig {
    pub fn from_file(path: &Path) -> Result<ModelConfig> {
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
        Ok(ModelConfig {
            kind,
            vision,
            text,
            projection_dim: top.usize("projection_dim", 512)?,
            logit_scale_init: top.f32("logit_scale_init_value", 2.6592)?,
            raw,
        })
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
            // RoBERTa's positions start after padding_idx.
            TextConfig::Roberta(c) => c.max_position_embeddings - c.pad_token_id as usize - 1,
        }
    }
}

//! Random initialisation with the distributions transformers 5.24 uses for
//! CLIPModel and VisionTextDualEncoderModel (CLIP vision + CLIP or RoBERTa
//! text). The values come from our own seeded RNG (splitmix64 + Box–Muller),
//! not torch's stream; the per-tensor distributions are the same (checked
//! against transformers-initialised models by tests/init.rs).
//!
//! The rules, as transformers applies them (children first, so the most
//! specific `_init_weights` branch wins):
//!
//! * Each tower is its own PreTrainedModel (CLIPVisionModel, CLIPTextModel,
//!   RobertaModel), even inside CLIPModel, so a tower's `initializer_factor`
//!   (CLIP) or `initializer_range` (RoBERTa) comes from the tower's config.
//! * CLIP towers, with `f` = tower `initializer_factor`, `d` = hidden size,
//!   `L` = its number of layers: class_embedding N(0, d^-0.5 f);
//!   patch and vision position embeddings N(0, initializer_range f); text
//!   token and position embeddings N(0, 0.02 f); q/k/v_proj
//!   N(0, d^-0.5 (2L)^-0.5 f); out_proj N(0, d^-0.5 f); fc1
//!   N(0, (2d)^-0.5 f); fc2 N(0, d^-0.5 (2L)^-0.5 f); LayerNorm 1 / 0;
//!   every bias 0.
//! * RoBERTa: every Linear and Embedding weight N(0, initializer_range), the
//!   padding_idx (= pad_token_id) row of the word and position embeddings 0,
//!   LayerNorm 1 / 0, biases 0.
//! * Projections: CLIPModel uses `text_hidden^-0.5 F` and
//!   `vision_hidden^-0.5 F` with the top-level `initializer_factor` F;
//!   VisionTextDualEncoderModel has no `_init_weights` of its own, so
//!   PreTrainedModel's default gives both N(0, text_config.initializer_range).
//! * `logit_scale` = `logit_scale_init_value`.
//!
//! Every tensor draws from its own stream, seeded by (seed, tensor name), so a
//! tensor's values do not depend on which other tensors exist.

use super::clip::ClipModel;
use super::config::{ModelConfig, ModelKind, TextConfig};
use super::weights::{HostTensor, Weights};
use anyhow::{bail, ensure, Result};
use serde_json::{Map, Value};

/// splitmix64 for the bits, Box–Muller (both outputs) for normals.
pub struct InitRng {
    state: u64,
    spare: Option<f64>,
}

impl InitRng {
    pub fn new(seed: u64) -> InitRng {
        InitRng {
            state: seed,
            spare: None,
        }
    }

    /// The stream of one named tensor.
    pub fn for_tensor(seed: u64, name: &str) -> InitRng {
        // FNV-1a of the name, then mixed with the seed by splitmix's finaliser.
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in name.bytes() {
            h ^= b as u64;
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        let mut r = InitRng::new(seed ^ h.rotate_left(17));
        let mixed = r.next_u64();
        InitRng::new(mixed ^ h)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1), 53 random bits.
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Standard normal.
    pub fn normal(&mut self) -> f64 {
        if let Some(z) = self.spare.take() {
            return z;
        }
        // u1 in (0, 1] so that ln(u1) is finite.
        let u1 = 1.0 - self.uniform();
        let u2 = self.uniform();
        let r = (-2.0 * u1.ln()).sqrt();
        let (s, c) = (std::f64::consts::TAU * u2).sin_cos();
        self.spare = Some(r * s);
        r * c
    }
}

/// How one tensor is initialised.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Init {
    /// Every element equal (LayerNorm weights 1, biases 0, logit_scale).
    Const(f32),
    /// N(0, std²); `zero_row`: the padding_idx row of an nn.Embedding, set to 0.
    Normal { std: f64, zero_row: Option<usize> },
}

fn normal(std: f64) -> Init {
    Init::Normal {
        std,
        zero_row: None,
    }
}

/// A tower's JSON config as transformers builds it (for the init settings
/// read here), or the inner one for a dual encoder whose vision tower is
/// described by a full CLIP config. With a legacy `<key>_dict`, CLIPConfig
/// updates `<key>` with the complete config built from the dict alone, so
/// settings the dict lacks take the class defaults.
fn tower_raw(top: &Value, key: &str, kind: ModelKind) -> Map<String, Value> {
    let merged = |obj: &Value, key: &str| -> Map<String, Value> {
        let mut m = obj
            .get(key)
            .and_then(|v| v.as_object())
            .cloned()
            .unwrap_or_default();
        if let Some(legacy) = obj.get(format!("{key}_dict")).and_then(|v| v.as_object()) {
            m.remove("initializer_factor");
            m.remove("initializer_range");
            for (k, v) in legacy {
                m.insert(k.clone(), v.clone());
            }
        }
        m
    };
    let m = merged(top, key);
    if kind == ModelKind::DualEncoder
        && m.get("model_type").and_then(|v| v.as_str()) == Some("clip")
    {
        return merged(&Value::Object(m), key);
    }
    m
}

fn num(m: &Map<String, Value>, key: &str, default: f64) -> f64 {
    m.get(key).and_then(|v| v.as_f64()).unwrap_or(default)
}

/// The CLIP encoder-layer stds of one tower.
struct ClipTower {
    factor: f64,
    range: f64,
    hidden: f64,
    layers: f64,
}

impl ClipTower {
    fn encoder(&self, rest: &str) -> Option<Init> {
        let d = self.hidden;
        let f = self.factor;
        let in_std = d.powf(-0.5) * (2.0 * self.layers).powf(-0.5) * f;
        let std = if rest.ends_with(".self_attn.q_proj.weight")
            || rest.ends_with(".self_attn.k_proj.weight")
            || rest.ends_with(".self_attn.v_proj.weight")
            || rest.ends_with(".mlp.fc2.weight")
        {
            in_std
        } else if rest.ends_with(".self_attn.out_proj.weight") {
            d.powf(-0.5) * f
        } else if rest.ends_with(".mlp.fc1.weight") {
            (2.0 * d).powf(-0.5) * f
        } else {
            return common(rest);
        };
        Some(normal(std))
    }
}

/// Biases and LayerNorm weights, the same in every tower.
fn common(rest: &str) -> Option<Init> {
    const NORMS: [&str; 6] = [
        "layer_norm1.weight",
        "layer_norm2.weight",
        "pre_layrnorm.weight",
        "post_layernorm.weight",
        "final_layer_norm.weight",
        "LayerNorm.weight",
    ];
    if rest.ends_with(".bias") || rest == "bias" {
        Some(Init::Const(0.0))
    } else if NORMS
        .iter()
        .any(|n| rest == *n || rest.ends_with(&format!(".{n}")))
    {
        Some(Init::Const(1.0))
    } else {
        None
    }
}

/// The initialisation transformers gives the tensor `name` of a model with
/// this config (names as `ClipModel::expected_tensors` lists them).
pub fn init_spec(config: &ModelConfig, name: &str) -> Result<Init> {
    let raw = &config.raw;
    let kind = config.kind;
    let vraw = tower_raw(raw, "vision_config", kind);
    let traw = tower_raw(raw, "text_config", kind);
    let vision = ClipTower {
        factor: num(&vraw, "initializer_factor", 1.0),
        range: num(&vraw, "initializer_range", 0.02),
        hidden: config.vision.hidden_size as f64,
        layers: config.vision.num_hidden_layers as f64,
    };
    let text_range = num(&traw, "initializer_range", 0.02);
    let spec = if name == "logit_scale" {
        Some(Init::Const(config.logit_scale_init))
    } else if name == "visual_projection.weight" || name == "text_projection.weight" {
        Some(normal(match kind {
            ModelKind::Clip => {
                let hidden = if name == "visual_projection.weight" {
                    config.vision.hidden_size
                } else {
                    config.text.hidden_size()
                };
                (hidden as f64).powf(-0.5)
                    * raw
                        .get("initializer_factor")
                        .and_then(|v| v.as_f64())
                        .unwrap_or(1.0)
            }
            ModelKind::DualEncoder => text_range,
        }))
    } else if let Some(rest) = name.strip_prefix("vision_model.") {
        match rest {
            "embeddings.class_embedding" => Some(normal(vision.hidden.powf(-0.5) * vision.factor)),
            "embeddings.patch_embedding.weight" | "embeddings.position_embedding.weight" => {
                Some(normal(vision.range * vision.factor))
            }
            _ => vision.encoder(rest),
        }
    } else if let Some(rest) = name.strip_prefix("text_model.") {
        match &config.text {
            TextConfig::Clip(c) => {
                let tower = ClipTower {
                    factor: num(&traw, "initializer_factor", 1.0),
                    range: text_range,
                    hidden: c.hidden_size as f64,
                    layers: c.num_hidden_layers as f64,
                };
                match rest {
                    "embeddings.token_embedding.weight"
                    | "embeddings.position_embedding.weight" => Some(normal(0.02 * tower.factor)),
                    _ => tower.encoder(rest),
                }
            }
            TextConfig::Roberta(c) => match rest {
                "embeddings.word_embeddings.weight" | "embeddings.position_embeddings.weight" => {
                    Some(Init::Normal {
                        std: text_range,
                        zero_row: Some(c.pad_token_id as usize),
                    })
                }
                _ => common(rest).or_else(|| rest.ends_with(".weight").then(|| normal(text_range))),
            },
        }
    } else {
        None
    };
    match spec {
        Some(s) => Ok(s),
        None => bail!("no initialisation rule for tensor {name:?}"),
    }
}

/// A freshly initialised tensor `name` of shape `shape`.
pub fn init_tensor(
    config: &ModelConfig,
    name: &str,
    shape: &[usize],
    seed: u64,
) -> Result<HostTensor> {
    let n: usize = shape.iter().product();
    let data = match init_spec(config, name)? {
        Init::Const(v) => vec![v; n],
        Init::Normal { std, zero_row } => {
            let mut rng = InitRng::for_tensor(seed, name);
            let mut data: Vec<f32> = (0..n).map(|_| (rng.normal() * std) as f32).collect();
            if let Some(row) = zero_row {
                ensure!(
                    shape.len() == 2 && row < shape[0],
                    "{name}: padding row {row} is outside the embedding of shape {shape:?}"
                );
                data[row * shape[1]..(row + 1) * shape[1]].fill(0.0);
            }
            data
        }
    };
    Ok(HostTensor::new(shape, data))
}

/// Every tensor of a freshly initialised model, named and shaped as
/// `ClipModel::expected_tensors(config)` lists them (`logit_scale` as [1]),
/// ready for `ClipModel::from_weights`.
pub fn init_weights(config: &ModelConfig, seed: u64) -> Result<Weights> {
    let mut w = Weights::default();
    for (name, shape) in ClipModel::expected_tensors(config)? {
        let t = init_tensor(config, &name, &shape, seed)?;
        w.tensors.insert(name, t);
    }
    Ok(w)
}

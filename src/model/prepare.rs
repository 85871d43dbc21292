//! run_clip.py's preparation step: a VisionTextDualEncoder folder from a
//! CLIP (or CLIP vision) folder and a RoBERTa folder, as transformers 5.24
//! writes it with
//!
//! ```python
//! model = VisionTextDualEncoderModel.from_vision_text_pretrained(clip_dir, roberta_dir)
//! processor = VisionTextDualEncoderProcessor(
//!     AutoImageProcessor.from_pretrained(clip_dir), AutoTokenizer.from_pretrained(roberta_dir))
//! model.save_pretrained(out); processor.save_pretrained(out)
//! ```
//!
//! * config.json: `vision_config` is the CLIP vision config (a CLIPModel's
//!   `vision_config`, or a CLIPVisionModel's whole config), `text_config` the
//!   RoBERTa config, each with the class defaults transformers fills in for
//!   absent keys, `_name_or_path` = the folder as given and `dtype` float32;
//!   `projection_dim` (default 512) and `logit_scale_init_value` 2.6592.
//! * Weights: the vision tower (`vision_model.*` of a CLIPModel, or the bare
//!   names transformers 5 gives a CLIPVisionModel) as `vision_model.*`; the
//!   CLIP text tower and CLIP's projections and logit_scale are dropped. The
//!   RoBERTa tensors (without the `roberta.` prefix of RobertaForMaskedLM and
//!   other head models; heads such as `lm_head.*` dropped; legacy
//!   `LayerNorm.gamma/beta` renamed) as `text_model.*`. Fresh tensors, drawn
//!   as transformers initialises them (see `init`): `visual_projection`,
//!   `text_projection`, `text_model.pooler.dense.*` when the RoBERTa folder
//!   has no pooler (a RobertaForMaskedLM save such as roberta-base), and
//!   `logit_scale` = 2.6592. Everything is stored as float32.
//! * Processor: `processor_config.json` = `{"image_processor": <the CLIP
//!   folder's image processor settings>, "processor_class":
//!   "VisionTextDualEncoderProcessor"}`; the RoBERTa folder's tokenizer files
//!   are copied as they are (`tokenizer_config.json` is written with
//!   RobertaTokenizer's settings when the folder has none, as for the hub's
//!   roberta-base, so the pad token is known).

use super::clip::ClipModel;
use super::config::ModelConfig;
use super::init::init_tensor;
use super::weights::{save_file, write_atomic, HostTensor, Weights};
use anyhow::{bail, ensure, Context, Result};
use serde_json::{json, Map, Value};
use std::collections::BTreeMap;
use std::path::Path;

/// transformers' `logit_scale_init_value` default for the dual encoder.
pub const LOGIT_SCALE_INIT: f64 = 2.6592;
/// `VisionTextDualEncoderConfig.projection_dim` default.
pub const DEFAULT_PROJECTION_DIM: usize = 512;

/// CLIPVisionConfig's own fields and their defaults (transformers 5.24); a
/// saved config lists every one of them.
fn clip_vision_defaults() -> Value {
    json!({
        "attention_dropout": 0.0,
        "hidden_act": "quick_gelu",
        "hidden_size": 768,
        "image_size": 224,
        "initializer_factor": 1.0,
        "initializer_range": 0.02,
        "intermediate_size": 3072,
        "layer_norm_eps": 1e-5,
        "num_attention_heads": 12,
        "num_channels": 3,
        "num_hidden_layers": 12,
        "patch_size": 32,
        "projection_dim": 512
    })
}

/// RobertaConfig's own fields and their defaults (transformers 5.24).
fn roberta_defaults() -> Value {
    json!({
        "add_cross_attention": false,
        "attention_probs_dropout_prob": 0.1,
        "bos_token_id": 0,
        "classifier_dropout": null,
        "eos_token_id": 2,
        "hidden_act": "gelu",
        "hidden_dropout_prob": 0.1,
        "hidden_size": 768,
        "initializer_range": 0.02,
        "intermediate_size": 3072,
        "is_decoder": false,
        "layer_norm_eps": 1e-12,
        "max_position_embeddings": 512,
        "num_attention_heads": 12,
        "num_hidden_layers": 12,
        "pad_token_id": 1,
        "tie_word_embeddings": true,
        "type_vocab_size": 2,
        "use_cache": true,
        "vocab_size": 50265
    })
}

/// RobertaTokenizer's settings as transformers 5.24 saves them (less the
/// load-time `is_local`/`local_files_only` and `model_max_length`, whose
/// absence means the same "no limit").
fn roberta_tokenizer_config() -> Value {
    json!({
        "add_prefix_space": false,
        "backend": "tokenizers",
        "bos_token": "<s>",
        "cls_token": "<s>",
        "eos_token": "</s>",
        "errors": "replace",
        "mask_token": "<mask>",
        "pad_token": "<pad>",
        "processor_class": PROCESSOR_CLASS,
        "sep_token": "</s>",
        "tokenizer_class": "RobertaTokenizer",
        "trim_offsets": true,
        "unk_token": "<unk>"
    })
}

const PROCESSOR_CLASS: &str = "VisionTextDualEncoderProcessor";

/// Tokenizer files copied from the text folder when present.
const TOKENIZER_FILES: [&str; 6] = [
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
];

fn read_json(path: &Path) -> Result<Value> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{} is not valid JSON", path.display()))
}

fn model_config(dir: &Path, what: &str) -> Result<Value> {
    ensure!(
        dir.is_dir(),
        "{what} folder {} does not exist",
        dir.display()
    );
    let path = dir.join("config.json");
    ensure!(
        path.is_file(),
        "{what} folder {} has no config.json (not a Hugging Face model folder)",
        dir.display()
    );
    let v = read_json(&path)?;
    ensure!(v.is_object(), "{} must be a JSON object", path.display());
    Ok(v)
}

/// `obj[key]` as CLIPConfig builds it: with a legacy `obj[key + "_dict"]`,
/// `obj[key]` is updated with the complete config built from the dict alone
/// (class defaults for what the dict lacks).
fn merged(obj: &Value, key: &str, defaults: Value) -> Map<String, Value> {
    let mut m = obj
        .get(key)
        .and_then(|v| v.as_object())
        .cloned()
        .unwrap_or_default();
    if let Some(legacy) = obj.get(format!("{key}_dict")).and_then(|v| v.as_object()) {
        if let Value::Object(d) = defaults {
            m.extend(d);
        }
        for (k, v) in legacy {
            m.insert(k.clone(), v.clone());
        }
    }
    m
}

/// A tower config as transformers nests it: class defaults under the file's
/// keys, no version/legacy dtype, the source folder and our float32 dtype.
fn sub_config(mut m: Map<String, Value>, defaults: Value, model_type: &str, dir: &Path) -> Value {
    if let Value::Object(d) = defaults {
        for (k, v) in d {
            m.entry(k).or_insert(v);
        }
    }
    m.remove("transformers_version");
    m.remove("torch_dtype");
    m.insert("model_type".into(), model_type.into());
    m.insert(
        "_name_or_path".into(),
        dir.to_string_lossy().into_owned().into(),
    );
    m.insert("dtype".into(), "float32".into());
    Value::Object(m)
}

fn model_type(v: &Value) -> &str {
    v.get("model_type").and_then(|t| t.as_str()).unwrap_or("")
}

/// The vision tower's tensors by name inside the tower (`embeddings.*`,
/// `encoder.*`, `pre_layrnorm.*`, `post_layernorm.*`).
fn vision_tensors(w: Weights) -> BTreeMap<String, HostTensor> {
    const ROOTS: [&str; 4] = [
        "embeddings.",
        "encoder.",
        "pre_layrnorm.",
        "post_layernorm.",
    ];
    w.tensors
        .into_iter()
        .filter_map(|(k, t)| {
            // CLIPModel (and transformers 4's CLIPVisionModel) nest the tower
            // under `vision_model.`; transformers 5's CLIPVisionModel does not.
            let rest = k.strip_prefix("vision_model.").unwrap_or(&k);
            (ROOTS.iter().any(|r| rest.starts_with(r)) && !rest.ends_with("position_ids"))
                .then(|| (rest.to_string(), t))
        })
        .collect()
}

/// The RoBERTa encoder's tensors by name inside RobertaModel.
fn roberta_tensors(w: Weights) -> BTreeMap<String, HostTensor> {
    const ROOTS: [&str; 3] = ["embeddings.", "encoder.", "pooler."];
    // Head models (RobertaForMaskedLM, ...) hold the encoder as `roberta.*`
    // next to their heads.
    let prefixed = w.tensors.keys().any(|k| k.starts_with("roberta."));
    w.tensors
        .into_iter()
        .filter_map(|(k, t)| {
            let rest = if prefixed {
                k.strip_prefix("roberta.")?
            } else {
                &k
            };
            if !ROOTS.iter().any(|r| rest.starts_with(r)) || rest.ends_with("_ids") {
                return None;
            }
            // Old TF-style names, renamed by transformers on load.
            let name = if let Some(p) = rest.strip_suffix("LayerNorm.gamma") {
                format!("{p}LayerNorm.weight")
            } else if let Some(p) = rest.strip_suffix("LayerNorm.beta") {
                format!("{p}LayerNorm.bias")
            } else {
                rest.to_string()
            };
            Some((name, t))
        })
        .collect()
}

fn listing(names: &[String]) -> String {
    let shown: Vec<&str> = names.iter().take(8).map(|s| s.as_str()).collect();
    match names.len().saturating_sub(8) {
        0 => shown.join(", "),
        more => format!("{} and {more} more", shown.join(", ")),
    }
}

/// The image processor settings of the vision folder, as AutoImageProcessor
/// finds them: `processor_config.json`'s `image_processor` entry, else
/// `preprocessor_config.json`.
fn image_processor(dir: &Path) -> Result<Value> {
    let processor = dir.join("processor_config.json");
    if processor.is_file() {
        if let Some(ip) = read_json(&processor)?.get("image_processor") {
            ensure!(
                ip.is_object(),
                "{}: \"image_processor\" must be a JSON object",
                processor.display()
            );
            return Ok(ip.clone());
        }
    }
    let pre = dir.join("preprocessor_config.json");
    if pre.is_file() {
        let v = read_json(&pre)?;
        ensure!(v.is_object(), "{} must be a JSON object", pre.display());
        return Ok(v);
    }
    bail!(
        "vision folder {} has no image processor settings (preprocessor_config.json, or \
         processor_config.json with an \"image_processor\" entry); run_clip.py takes them from \
         the CLIP folder",
        dir.display()
    )
}

/// Build the dual-encoder folder `out_dir` from the CLIP (or CLIP vision)
/// folder `vision_dir` and the RoBERTa folder `text_dir`. Fresh tensors are
/// drawn with `seed`. Nothing is written unless every input checks out.
pub fn prepare_dual_encoder(
    vision_dir: &Path,
    text_dir: &Path,
    out_dir: &Path,
    projection_dim: Option<usize>,
    seed: u64,
) -> Result<()> {
    // Configs.
    let vraw = model_config(vision_dir, "vision")?;
    let vision_cfg = match model_type(&vraw) {
        "clip" => merged(&vraw, "vision_config", clip_vision_defaults()),
        "clip_vision_model" => vraw.as_object().cloned().unwrap_or_default(),
        other => bail!(
            "{}: model_type {other:?} is not a CLIP model; the vision tower comes from a CLIPModel \
             (\"clip\") or CLIPVisionModel (\"clip_vision_model\") folder",
            vision_dir.join("config.json").display()
        ),
    };
    let traw = model_config(text_dir, "text")?;
    ensure!(
        model_type(&traw) == "roberta",
        "{}: model_type {:?} is not RoBERTa; the text tower comes from a RoBERTa (\"roberta\") folder",
        text_dir.join("config.json").display(),
        model_type(&traw)
    );
    let projection_dim = projection_dim.unwrap_or(DEFAULT_PROJECTION_DIM);
    ensure!(projection_dim > 0, "projection_dim must be positive");
    let top = json!({
        "architectures": ["VisionTextDualEncoderModel"],
        "dtype": "float32",
        "logit_scale_init_value": LOGIT_SCALE_INIT,
        "model_type": "vision-text-dual-encoder",
        "projection_dim": projection_dim,
        "text_config": sub_config(
            traw.as_object().cloned().unwrap_or_default(),
            roberta_defaults(),
            "roberta",
            text_dir
        ),
        "transformers_version": "5.24.0",
        "vision_config": sub_config(vision_cfg, clip_vision_defaults(), "clip_vision_model", vision_dir),
    });
    let config = ModelConfig::from_value(
        top.clone(),
        &format!(
            "dual-encoder config from {} and {}",
            vision_dir.display(),
            text_dir.display()
        ),
    )?;

    // Weights.
    let vision = vision_tensors(Weights::load_dir(vision_dir)?);
    let text = roberta_tensors(Weights::load_dir(text_dir)?);
    let mut out: Vec<(String, HostTensor)> = Vec::new();
    let (mut vision_missing, mut text_missing, mut wrong, mut fresh) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for (name, shape) in ClipModel::expected_tensors(&config)? {
        let found = if let Some(rest) = name.strip_prefix("vision_model.") {
            let t = vision.get(rest);
            if t.is_none() {
                vision_missing.push(rest.to_string());
            }
            t.map(|t| (t, vision_dir))
        } else if let Some(rest) = name.strip_prefix("text_model.") {
            let t = text.get(rest);
            // RobertaForMaskedLM has no pooler: transformers initialises it.
            if t.is_none() && !rest.starts_with("pooler.") {
                text_missing.push(rest.to_string());
            }
            t.map(|t| (t, text_dir))
        } else {
            None
        };
        match found {
            Some((t, dir)) => {
                if t.shape != shape {
                    wrong.push(format!(
                        "{}: {name} is {:?} in the folder, its config implies {shape:?}",
                        dir.display(),
                        t.shape
                    ));
                }
                out.push((name, t.clone()));
            }
            None => {
                let mut t = init_tensor(&config, &name, &shape, seed)?;
                if name == "logit_scale" {
                    t.shape.clear(); // a 0-d parameter in PyTorch
                }
                fresh.push(name.clone());
                out.push((name, t));
            }
        }
    }
    let mut problems = Vec::new();
    if !vision_missing.is_empty() {
        problems.push(format!(
            "vision folder {} lacks {} tensor(s) of the CLIP vision tower its config.json describes: {}",
            vision_dir.display(),
            vision_missing.len(),
            listing(&vision_missing)
        ));
    }
    if !text_missing.is_empty() {
        problems.push(format!(
            "text folder {} lacks {} RoBERTa tensor(s) its config.json implies: {}",
            text_dir.display(),
            text_missing.len(),
            listing(&text_missing)
        ));
    }
    problems.extend(wrong);
    if !problems.is_empty() {
        bail!("{}", problems.join("\n"));
    }

    // Processor and tokenizer files.
    let processor = json!({ "image_processor": image_processor(vision_dir)?, "processor_class": PROCESSOR_CLASS });
    if !text_dir.join("tokenizer.json").is_file() {
        let hint = if text_dir.join("vocab.json").is_file() && text_dir.join("merges.txt").is_file()
        {
            " (it has vocab.json and merges.txt; transformers writes tokenizer.json from them: \
             AutoTokenizer.from_pretrained(DIR).save_pretrained(DIR))"
        } else {
            ""
        };
        bail!(
            "text folder {} has no tokenizer.json{hint}",
            text_dir.display()
        );
    }
    let mut files: Vec<(&str, Vec<u8>)> = Vec::new();
    for name in TOKENIZER_FILES {
        let p = text_dir.join(name);
        if p.is_file() {
            files.push((
                name,
                std::fs::read(&p).with_context(|| format!("reading {}", p.display()))?,
            ));
        }
    }
    if !files.iter().any(|(n, _)| *n == "tokenizer_config.json") {
        let mut tc = roberta_tokenizer_config();
        // An old special_tokens_map.json overrides the class defaults.
        let map = text_dir.join("special_tokens_map.json");
        if map.is_file() {
            if let Value::Object(m) = read_json(&map)? {
                for (k, v) in m {
                    tc[k] = v;
                }
            }
        }
        files.push((
            "tokenizer_config.json",
            (serde_json::to_string_pretty(&tc)? + "\n").into_bytes(),
        ));
    }

    // Write.
    std::fs::create_dir_all(out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
    let canon = |p: &Path| std::fs::canonicalize(p).ok();
    let out_c = canon(out_dir);
    ensure!(
        out_c != canon(vision_dir) && out_c != canon(text_dir),
        "the output folder {} must differ from the source folders",
        out_dir.display()
    );
    save_file(&out_dir.join("model.safetensors"), &out)?;
    write_atomic(
        &out_dir.join("config.json"),
        (serde_json::to_string_pretty(&top)? + "\n").as_bytes(),
    )?;
    write_atomic(
        &out_dir.join("processor_config.json"),
        (serde_json::to_string_pretty(&processor)? + "\n").as_bytes(),
    )?;
    for (name, bytes) in &files {
        write_atomic(&out_dir.join(name), bytes)?;
    }
    eprintln!(
        "note: {} newly initialised (seed {seed}): {}",
        out_dir.display(),
        fresh.join(", ")
    );
    Ok(())
}

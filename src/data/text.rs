//! Captions to token ids, as transformers' fast tokenizers produce them.
//!
//! transformers' `tokenizer(texts, padding="max_length", max_length=N,
//! truncation=True)` configures the Rust `tokenizers` library (longest-first
//! truncation that leaves room for the special tokens, fixed-length padding
//! with the tokenizer's pad token) and calls its `encode_batch`. We load the
//! same `tokenizer.json` into the same library and configure it the same way,
//! so ids match by construction: for CLIP, `<|startoftext|> ... <|endoftext|>`
//! (the end token survives truncation), padded with `<|endoftext|>` (49407);
//! for RoBERTa, `<s> ... </s>` padded with `<pad>` (1).
//!
//! The pad token comes from `tokenizer_config.json` (`"pad_token"`), else
//! `special_tokens_map.json`, else the padding section of `tokenizer.json`,
//! which is where transformers finds it too.

use crate::data::loader::catch_quietly;
use anyhow::{anyhow, bail, Context, Result};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use tokenizers::{
    PaddingDirection, PaddingParams, PaddingStrategy, PostProcessor, Tokenizer,
    TruncationDirection, TruncationParams, TruncationStrategy,
};

/// A `tokenizer.json` tokenizer with transformers' padding/truncation rules.
pub struct TextTokenizer {
    // `tokenizers` takes &mut to change padding/truncation; the lock keeps
    // `encode_batch` usable through &self (e.g. from a loader thread).
    inner: Mutex<Tokenizer>,
    path: PathBuf,
    /// (id, token) used for padding; None if the tokenizer defines none.
    pad: Option<(u32, String)>,
    pad_left: bool,
    truncate_left: bool,
}

impl std::fmt::Debug for TextTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TextTokenizer")
            .field("path", &self.path)
            .field("pad", &self.pad)
            .finish()
    }
}

fn read_json_opt(path: &Path) -> Result<Option<Value>> {
    if !path.is_file() {
        return Ok(None);
    }
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let v = serde_json::from_str(&text)
        .with_context(|| format!("parsing {} as JSON", path.display()))?;
    Ok(Some(v))
}

/// A special-token entry: a string, or an AddedToken object with "content".
fn token_str(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o
            .get("content")
            .and_then(|c| c.as_str())
            .map(str::to_string),
        _ => None,
    }
}

impl TextTokenizer {
    /// Load `<dir>/tokenizer.json` (+ `tokenizer_config.json` and
    /// `special_tokens_map.json` when present).
    pub fn from_model_dir(dir: &Path) -> Result<Self> {
        Self::from_files(&dir.join("tokenizer.json"), Some(dir))
    }

    /// Load a `tokenizer.json`; `config_dir`, if given, is searched for
    /// `tokenizer_config.json` / `special_tokens_map.json`.
    pub fn from_files(tokenizer_json: &Path, config_dir: Option<&Path>) -> Result<Self> {
        if !tokenizer_json.is_file() {
            bail!("tokenizer file {} does not exist", tokenizer_json.display());
        }
        // `tokenizers` panics on some malformed files (e.g. an odd decoder).
        let mut tok = catch_quietly(|| Tokenizer::from_file(tokenizer_json))
            .map_err(|why| {
                anyhow!(
                    "loading tokenizer {}: the file is malformed (the tokenizers library \
                     failed: {why})",
                    tokenizer_json.display()
                )
            })?
            .map_err(|e| anyhow!("loading tokenizer {}: {e}", tokenizer_json.display()))?;
        let file_padding = tok.get_padding().map(|p| (p.pad_id, p.pad_token.clone()));
        tok.with_padding(None);
        tok.with_truncation(None)
            .map_err(|e| anyhow!("{}: {e}", tokenizer_json.display()))?;

        let mut pad_token = None;
        let mut pad_left = false;
        let mut truncate_left = false;
        if let Some(dir) = config_dir {
            let cfg_path = dir.join("tokenizer_config.json");
            if let Some(cfg) = read_json_opt(&cfg_path)? {
                if let Some(v) = cfg.get("pad_token").filter(|v| !v.is_null()) {
                    pad_token = Some(token_str(v).with_context(|| {
                        format!(
                            "{}: pad_token must be a string, got {v}",
                            cfg_path.display()
                        )
                    })?);
                }
                let side = |key: &str| -> Result<bool> {
                    match cfg.get(key).filter(|v| !v.is_null()) {
                        None => Ok(false),
                        Some(Value::String(s)) if s == "right" => Ok(false),
                        Some(Value::String(s)) if s == "left" => Ok(true),
                        Some(v) => bail!(
                            "{}: {key} must be \"left\" or \"right\", got {v}",
                            cfg_path.display()
                        ),
                    }
                };
                pad_left = side("padding_side")?;
                truncate_left = side("truncation_side")?;
            }
            if pad_token.is_none() {
                let map_path = dir.join("special_tokens_map.json");
                if let Some(map) = read_json_opt(&map_path)? {
                    pad_token = map.get("pad_token").and_then(token_str);
                }
            }
        }
        let pad = match pad_token {
            Some(t) => {
                let id = tok.token_to_id(&t).with_context(|| {
                    format!(
                        "pad token {t:?} (from tokenizer_config.json) is not in the vocabulary of {}",
                        tokenizer_json.display()
                    )
                })?;
                Some((id, t))
            }
            None => file_padding,
        };
        Ok(TextTokenizer {
            inner: Mutex::new(tok),
            path: tokenizer_json.to_path_buf(),
            pad,
            pad_left,
            truncate_left,
        })
    }

    /// The padding token id (49407 for CLIP, 1 for RoBERTa).
    pub fn pad_id(&self) -> Option<u32> {
        self.pad.as_ref().map(|p| p.0)
    }

    /// Id of a token string, e.g. `"<|endoftext|>"`.
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .token_to_id(token)
    }

    pub fn vocab_size(&self) -> usize {
        self.inner
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get_vocab_size(true)
    }

    /// Token ids without truncation or padding, special tokens included.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let tok = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let enc = catch_quietly(|| tok.encode(text, true))
            .map_err(|why| anyhow!("the tokenizers library failed: {why}"))
            .and_then(|r| r.map_err(|e| anyhow!("{e}")))
            .with_context(|| format!("tokenizing {text:?} with {}", self.path.display()))?;
        Ok(enc.get_ids().to_vec())
    }

    /// `tokenizer(texts, padding="max_length", max_length=max_len,
    /// truncation=True)`: ids [B, max_len] row-major and the attention mask
    /// (1.0 for tokens, 0.0 for padding) in the same layout.
    pub fn encode_batch(&self, texts: &[&str], max_len: usize) -> Result<(Vec<u32>, Vec<f32>)> {
        let (pad_id, pad_token) = self.pad.clone().with_context(|| {
            format!(
                "the tokenizer {} has no pad token (no \"pad_token\" in tokenizer_config.json), \
                 so it cannot pad to max_length",
                self.path.display()
            )
        })?;
        let mut tok = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        // `tokenizers` subtracts the special tokens from max_length without
        // checking (a panic in debug builds, a wrap-around in release).
        let special = tok
            .get_post_processor()
            .map_or(0, |p| p.added_tokens(false));
        if max_len < special {
            bail!(
                "a maximum length of {max_len} tokens leaves no room for the {special} special \
                 tokens that the tokenizer {} adds to every text; use a --max_seq_length of at \
                 least {special}",
                self.path.display()
            );
        }
        tok.with_truncation(Some(TruncationParams {
            direction: if self.truncate_left {
                TruncationDirection::Left
            } else {
                TruncationDirection::Right
            },
            max_length: max_len,
            strategy: TruncationStrategy::LongestFirst,
            stride: 0,
        }))
        .map_err(|e| anyhow!("truncation to {max_len} tokens: {e}"))?;
        tok.with_padding(Some(PaddingParams {
            strategy: PaddingStrategy::Fixed(max_len),
            direction: if self.pad_left {
                PaddingDirection::Left
            } else {
                PaddingDirection::Right
            },
            pad_to_multiple_of: None,
            pad_id,
            pad_type_id: 0,
            pad_token,
        }));
        let inputs: Vec<&str> = texts.to_vec();
        let encs = catch_quietly(|| tok.encode_batch(inputs, true));
        // Leave the shared tokenizer unconfigured for `encode`.
        tok.with_padding(None);
        let _ = tok.with_truncation(None);
        let encs = encs
            .map_err(|why| anyhow!("the tokenizers library failed: {why}"))
            .and_then(|r| r.map_err(|e| anyhow!("{e}")))
            .with_context(|| format!("tokenizing with {}", self.path.display()))?;
        let mut ids = Vec::with_capacity(texts.len() * max_len);
        let mut mask = Vec::with_capacity(texts.len() * max_len);
        for (e, text) in encs.iter().zip(texts) {
            if e.get_ids().len() != max_len {
                bail!(
                    "{text:?} encoded to {} tokens, not {max_len} (is max_len smaller than the \
                     special tokens?)",
                    e.get_ids().len()
                );
            }
            ids.extend_from_slice(e.get_ids());
            mask.extend(e.get_attention_mask().iter().map(|&m| m as f32));
        }
        Ok((ids, mask))
    }
}

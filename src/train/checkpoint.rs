//! Checkpoints in the Trainer's layout: `output_dir/checkpoint-N/` with the
//! model (safetensors + config.json + tokenizer and processor files), the
//! optimizer state, the scheduler, and `trainer_state.json` (log history and
//! our data position for an exact resume).
//!
//! A checkpoint is written into a temporary folder and renamed into place,
//! so a kill at any moment leaves either the complete new checkpoint or none
//! (the previous ones are untouched).

use crate::model::clip::ClipModel;
use crate::model::weights::{save_file, write_atomic, Weights};
use crate::train::optimizer::Optimizer;
use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};

/// Tokenizer and processor files that travel with every saved model.
#[derive(Clone, Default)]
pub struct ProcessingFiles {
    pub files: Vec<(String, Vec<u8>)>,
}

/// The files transformers reads beside the weights.
pub const PROCESSING_FILE_NAMES: &[&str] = &[
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "processor_config.json",
    "preprocessor_config.json",
];

impl ProcessingFiles {
    /// The tokenizer/processor files present in a model folder.
    pub fn from_dir(dir: &Path) -> Result<ProcessingFiles> {
        let mut files = Vec::new();
        for name in PROCESSING_FILE_NAMES {
            let p = dir.join(name);
            if p.is_file() {
                files.push((
                    name.to_string(),
                    std::fs::read(&p).with_context(|| format!("reading {}", p.display()))?,
                ));
            }
        }
        Ok(ProcessingFiles { files })
    }

    pub fn write_to(&self, dir: &Path) -> Result<()> {
        for (name, bytes) in &self.files {
            std::fs::write(dir.join(name), bytes)
                .with_context(|| format!("writing {}/{name}", dir.display()))?;
        }
        Ok(())
    }
}

/// Where the run stands: enough to continue exactly.
#[derive(Clone, Debug, Default)]
pub struct RunState {
    pub global_step: u64,
    /// Epochs completed, fractional (the Trainer's `epoch`).
    pub epoch: f64,
    /// The data epoch in progress and how many entries of its order the
    /// batches so far consumed.
    pub data_epoch: u64,
    pub data_position: usize,
    pub log_history: Vec<Value>,
}

impl RunState {
    pub fn to_json(&self, extra: &Value) -> Value {
        json!({
            "global_step": self.global_step,
            "epoch": self.epoch,
            "log_history": self.log_history,
            "clip_wgpu": {
                "data_epoch": self.data_epoch,
                "data_position": self.data_position,
            },
            "run": extra,
        })
    }

    pub fn from_json(v: &Value, file: &Path) -> Result<RunState> {
        let get_u = |path: &[&str]| -> Result<u64> {
            let mut cur = v;
            for k in path {
                cur = &cur[*k];
            }
            cur.as_u64().with_context(|| {
                format!(
                    "{}: {} is missing or not an integer",
                    file.display(),
                    path.join(".")
                )
            })
        };
        Ok(RunState {
            global_step: get_u(&["global_step"])?,
            epoch: v["epoch"].as_f64().unwrap_or(0.0),
            data_epoch: get_u(&["clip_wgpu", "data_epoch"])?,
            data_position: get_u(&["clip_wgpu", "data_position"])? as usize,
            log_history: v["log_history"].as_array().cloned().unwrap_or_default(),
        })
    }
}

/// Save the model with its processing files into `dir` (created).
pub fn save_model(dir: &Path, model: &ClipModel, processing: &ProcessingFiles) -> Result<()> {
    model.save(dir)?;
    processing.write_to(dir)
}

/// Write `output_dir/checkpoint-<step>` atomically.
pub fn save_checkpoint(
    output_dir: &Path,
    model: &ClipModel,
    opt: &Optimizer,
    state: &RunState,
    scheduler: &Value,
    run: &Value,
    processing: &ProcessingFiles,
) -> Result<PathBuf> {
    let name = format!("checkpoint-{}", state.global_step);
    let final_dir = output_dir.join(&name);
    let tmp = output_dir.join(format!(".{name}.tmp-{}", std::process::id()));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp)?;
    }
    std::fs::create_dir_all(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    save_model(&tmp, model, processing)?;
    save_file(
        &tmp.join("optimizer.safetensors"),
        &opt.state(&model.params)?,
    )?;
    write_atomic(
        &tmp.join("scheduler.json"),
        serde_json::to_string_pretty(scheduler)?.as_bytes(),
    )?;
    write_atomic(
        &tmp.join("trainer_state.json"),
        serde_json::to_string_pretty(&state.to_json(run))?.as_bytes(),
    )?;
    sync_dir(&tmp);
    if final_dir.exists() {
        // Same step saved again (e.g. the final step after a periodic save).
        std::fs::remove_dir_all(&final_dir)?;
    }
    std::fs::rename(&tmp, &final_dir)
        .with_context(|| format!("renaming {} to {}", tmp.display(), final_dir.display()))?;
    sync_dir(output_dir);
    Ok(final_dir)
}

fn sync_dir(dir: &Path) {
    if let Ok(f) = std::fs::File::open(dir) {
        let _ = f.sync_all();
    }
}

/// Complete checkpoints in `output_dir`, oldest first (by step).
pub fn checkpoints(output_dir: &Path) -> Vec<(u64, PathBuf)> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(output_dir) {
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            if let Some(n) = name
                .strip_prefix("checkpoint-")
                .and_then(|s| s.parse::<u64>().ok())
            {
                if e.path().join("trainer_state.json").is_file() {
                    out.push((n, e.path()));
                }
            }
        }
    }
    out.sort();
    out
}

/// The Trainer's get_last_checkpoint.
pub fn latest_checkpoint(output_dir: &Path) -> Option<PathBuf> {
    checkpoints(output_dir).pop().map(|(_, p)| p)
}

/// Keep the newest `limit` checkpoints (save_total_limit).
pub fn rotate(output_dir: &Path, limit: usize) -> Result<()> {
    let all = checkpoints(output_dir);
    if limit == 0 || all.len() <= limit {
        return Ok(());
    }
    for (_, p) in &all[..all.len() - limit] {
        std::fs::remove_dir_all(p)
            .with_context(|| format!("removing old checkpoint {}", p.display()))?;
    }
    Ok(())
}

pub struct Loaded {
    pub optimizer: Weights,
    pub state: RunState,
}

/// Read a checkpoint's optimizer state and run state (the model is loaded
/// from the same folder with `ClipModel::load`).
pub fn load_checkpoint(dir: &Path) -> Result<Loaded> {
    if !dir.join("trainer_state.json").is_file() {
        bail!(
            "{} is not a clip-wgpu checkpoint (no trainer_state.json)",
            dir.display()
        );
    }
    let f = dir.join("trainer_state.json");
    let v: Value = serde_json::from_str(
        &std::fs::read_to_string(&f).with_context(|| format!("reading {}", f.display()))?,
    )
    .with_context(|| format!("{} is not valid JSON", f.display()))?;
    Ok(Loaded {
        optimizer: Weights::load_file(&dir.join("optimizer.safetensors"))?,
        state: RunState::from_json(&v, &f)?,
    })
}

//! Checkpoints in the Trainer's layout: `output_dir/checkpoint-N/` with the
//! model (safetensors + config.json + tokenizer and processor files), the
//! optimizer state, the scheduler, and `trainer_state.json` (log history and
//! our data position for an exact resume).
//!
//! A checkpoint is written into a temporary folder and renamed into place,
//! so a kill at any moment leaves either the complete new checkpoint or none
//! (the previous ones are untouched).

use crate::model::clip::ClipModel;
use crate::model::weights::{save_file, write_atomic, HostTensor, Weights};
use crate::precision::{f32_to_bf16_bits, f32_to_f16_bits, Precision};
use crate::train::optimizer::Optimizer;
use crate::train::scaler::GradScaler;
use anyhow::{anyhow, bail, ensure, Context, Result};
use safetensors::tensor::TensorView;
use safetensors::Dtype;
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashMap};
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
    /// WebDataset training: where each rank's stream stands (a
    /// [`crate::data::webdataset::ResumePoint`] as JSON; a list of them,
    /// one per rank, under mpirun). None for other data and at an epoch's
    /// start.
    pub data_stream: Option<Value>,
    pub log_history: Vec<Value>,
    /// Optimizer steps skipped for a non-finite loss or gradient
    /// (`--skip_nonfinite_steps`).
    pub skipped_nonfinite_steps: u64,
    /// `--fp16`'s loss scaler (None in other precisions).
    pub grad_scaler: Option<GradScaler>,
}

impl RunState {
    /// Steps the learning rate schedule has taken: the Trainer does not
    /// step it after an update the loss scaler skipped.
    pub fn scheduler_step(&self) -> u64 {
        self.global_step - self.grad_scaler.as_ref().map_or(0, |s| s.skipped_steps)
    }

    pub fn to_json(&self, extra: &Value) -> Value {
        json!({
            "global_step": self.global_step,
            "epoch": self.epoch,
            "log_history": self.log_history,
            "clip_wgpu": {
                "data_epoch": self.data_epoch,
                "data_position": self.data_position,
                "skipped_nonfinite_steps": self.skipped_nonfinite_steps,
                "data_stream": self.data_stream,
                "grad_scaler": self.grad_scaler.as_ref().map(GradScaler::to_json),
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
        let grad_scaler = match v["clip_wgpu"].get("grad_scaler") {
            Some(g) if !g.is_null() => Some(GradScaler::from_json(g, &file.display().to_string())?),
            _ => None,
        };
        Ok(RunState {
            grad_scaler,
            global_step: get_u(&["global_step"])?,
            epoch: v["epoch"].as_f64().unwrap_or(0.0),
            data_epoch: get_u(&["clip_wgpu", "data_epoch"])?,
            data_position: get_u(&["clip_wgpu", "data_position"])? as usize,
            log_history: v["log_history"].as_array().cloned().unwrap_or_default(),
            skipped_nonfinite_steps: v["clip_wgpu"]["skipped_nonfinite_steps"]
                .as_u64()
                .unwrap_or(0),
            data_stream: v["clip_wgpu"]
                .get("data_stream")
                .filter(|s| !s.is_null())
                .cloned(),
        })
    }
}

/// Save the model with its processing files into `dir` (created), in f32.
pub fn save_model(dir: &Path, model: &ClipModel, processing: &ProcessingFiles) -> Result<()> {
    save_model_as(dir, model, processing, Precision::F32)
}

/// transformers' name of a floating format (config.json's `dtype`).
pub fn torch_dtype_name(dtype: Precision) -> &'static str {
    match dtype {
        Precision::F32 => "float32",
        Precision::F16 => "float16",
        Precision::Bf16 => "bfloat16",
    }
}

/// Save the model with its processing files into `dir` (created), its
/// floating tensors in `dtype` (rounded to nearest even), and config.json's
/// `dtype` saying so, as transformers' `save_pretrained` of a model in that
/// dtype writes it (only the top-level field: the towers' configs keep
/// theirs).
pub fn save_model_as(
    dir: &Path,
    model: &ClipModel,
    processing: &ProcessingFiles,
    dtype: Precision,
) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut tensors = model.params.to_host()?;
    for (name, t) in &mut tensors {
        if name == "logit_scale" {
            t.shape.clear(); // a 0-d parameter in PyTorch
        }
    }
    let file = dir.join("model.safetensors");
    if dtype == Precision::F32 {
        save_file(&file, &tensors)?;
    } else {
        save_half_file(&file, &tensors, dtype)?;
    }
    let mut config = model.config.raw.clone();
    set_config_dtype(&mut config, dtype);
    write_atomic(
        &dir.join("config.json"),
        serde_json::to_string_pretty(&config)?.as_bytes(),
    )?;
    processing.write_to(dir)
}

/// config.json's top-level `dtype` (transformers 5) set to `dtype`, and an
/// older `torch_dtype` field too where there is one, so that neither
/// contradicts the weights.
pub fn set_config_dtype(config: &mut Value, dtype: Precision) {
    if let Some(m) = config.as_object_mut() {
        let name = Value::from(torch_dtype_name(dtype));
        if m.contains_key("torch_dtype") {
            m.insert("torch_dtype".into(), name.clone());
        }
        m.insert("dtype".into(), name);
    }
}

/// Write tensors as `path` in a 16-bit format (F16 or BF16 safetensors,
/// `format: pt`), atomically. A finite value beyond f16's range is an
/// error naming the tensor, not a silent infinity.
pub fn save_half_file(
    path: &Path,
    tensors: &[(String, HostTensor)],
    dtype: Precision,
) -> Result<()> {
    let (st_dtype, to_bits): (Dtype, fn(f32) -> u16) = match dtype {
        Precision::F16 => (Dtype::F16, f32_to_f16_bits),
        Precision::Bf16 => (Dtype::BF16, f32_to_bf16_bits),
        Precision::F32 => bail!("save_half_file: f32 is not a 16-bit format"),
    };
    let mut bytes: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::with_capacity(tensors.len());
    for (name, t) in tensors {
        ensure!(
            t.shape.iter().product::<usize>() == t.data.len(),
            "tensor {name:?}: shape {:?} does not match {} values",
            t.shape,
            t.data.len()
        );
        let mut b = Vec::with_capacity(t.data.len() * 2);
        for &x in &t.data {
            let h = to_bits(x);
            if x.is_finite() && dtype.round(x).is_infinite() {
                bail!(
                    "--save_dtype {}: tensor {name} holds {x}, beyond the format's range \
                     (f16 reaches 65504); save with --save_dtype bf16 or f32",
                    dtype.name()
                );
            }
            b.extend_from_slice(&h.to_le_bytes());
        }
        bytes.push((name.clone(), t.shape.clone(), b));
    }
    let mut views = Vec::with_capacity(bytes.len());
    for (name, shape, b) in &bytes {
        let view = TensorView::new(st_dtype, shape.clone(), b)
            .map_err(|e| anyhow!("tensor {name:?}: {e}"))?;
        views.push((name.clone(), view));
    }
    let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
    let out = safetensors::serialize(views, Some(meta)).map_err(|e| anyhow!("serializing: {e}"))?;
    write_atomic(path, &out)
}

/// The folder of step `step`'s checkpoint.
pub fn checkpoint_dir(output_dir: &Path, step: u64) -> PathBuf {
    output_dir.join(format!("checkpoint-{step}"))
}

/// The kernel choices (tuning cache entries) the saving run used, in its
/// checkpoint: a resumed run takes them, so that it computes with the same
/// kernels (the same rounding) even on another machine.
pub const KERNEL_CHOICES: &str = "kernel_choices.json";

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
    let final_dir = checkpoint_dir(output_dir, state.global_step);
    let name = format!("checkpoint-{}", state.global_step);
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
    if let Some(p) = model.params.params.first() {
        let gpu = p.tensor.gpu();
        let choices = json!({
            "adapter": gpu.info.name,
            "driver": gpu.info.driver,
            "backend": format!("{:?}", gpu.info.backend),
            "choices": gpu.kernel_choices(),
        });
        write_atomic(
            &tmp.join(KERNEL_CHOICES),
            serde_json::to_string_pretty(&choices)?.as_bytes(),
        )?;
    }
    // Whatever the GPU reported meanwhile (a lost device, an error behind a
    // readback) stops the save here, before the rename: the previous
    // checkpoints stay the latest.
    if let Some(p) = model.params.params.first() {
        p.tensor.gpu().sync()?;
    }
    sync_dir(&tmp);
    // Same step saved again (e.g. the final step after a periodic save): the
    // old one is renamed aside, the new one in, then the old one removed, so
    // a kill at any moment leaves one of them (remove_stale_temp puts an
    // old one left aside back when the new one never arrived).
    let old = output_dir.join(format!(".{name}.old-{}", std::process::id()));
    let replacing = final_dir.exists();
    if replacing {
        if old.exists() {
            std::fs::remove_dir_all(&old)?;
        }
        std::fs::rename(&final_dir, &old)
            .with_context(|| format!("renaming {} aside", final_dir.display()))?;
    }
    std::fs::rename(&tmp, &final_dir)
        .with_context(|| format!("renaming {} to {}", tmp.display(), final_dir.display()))?;
    sync_dir(output_dir);
    if replacing {
        std::fs::remove_dir_all(&old)
            .with_context(|| format!("removing the replaced {}", old.display()))?;
    }
    Ok(final_dir)
}

fn sync_dir(dir: &Path) {
    if let Ok(f) = std::fs::File::open(dir) {
        let _ = f.sync_all();
    }
}

/// Tidy what a killed run left behind, saying what was done:
/// `.checkpoint-N.tmp-PID` folders (a save cut short; never a complete
/// checkpoint) are removed; a `.checkpoint-N.old-PID` folder (a complete
/// checkpoint renamed aside while the same step was saved again) is put
/// back as `checkpoint-N` if the new one never arrived, else removed.
/// Folders of a live process other than this one are kept.
pub fn remove_stale_temp(output_dir: &Path) -> Vec<String> {
    let mut done = Vec::new();
    let Ok(rd) = std::fs::read_dir(output_dir) else {
        return done;
    };
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        let Some(rest) = name.strip_prefix(".checkpoint-") else {
            continue;
        };
        let (step, pid, aside) = match (rest.split_once(".tmp-"), rest.split_once(".old-")) {
            (Some((step, pid)), _) => (step, pid, false),
            (_, Some((step, pid))) => (step, pid, true),
            _ => continue,
        };
        let Ok(pid) = pid.parse::<u32>() else {
            continue;
        };
        if pid != std::process::id() && process_alive(pid) {
            continue;
        }
        let live = output_dir.join(format!("checkpoint-{step}"));
        if aside && !live.exists() {
            if std::fs::rename(e.path(), &live).is_ok() {
                done.push(format!(
                    "restored {}: an earlier run was killed while saving that step again",
                    live.display()
                ));
            }
        } else if std::fs::remove_dir_all(e.path()).is_ok() {
            done.push(format!(
                "removed {}: a checkpoint save that an earlier run did not finish",
                e.path().display()
            ));
        }
    }
    done
}

#[cfg(unix)]
fn process_alive(pid: u32) -> bool {
    // Signal 0 checks that the process exists (EPERM: it does, not ours).
    let r = unsafe { libc::kill(pid as libc::pid_t, 0) };
    r == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

#[cfg(not(unix))]
fn process_alive(_pid: u32) -> bool {
    false
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
    /// What the run that saved it was (`trainer_state.json`'s "run": seed,
    /// train_examples, batch_size, gradient_accumulation_steps, world_size
    /// when above 1, max_steps); null in checkpoints older than that.
    pub run: Value,
    /// The saving run's kernel choices and the adapter that made them
    /// (absent in older checkpoints).
    pub kernel_choices: Option<(BTreeMap<String, String>, String)>,
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
        run: v["run"].clone(),
        kernel_choices: read_kernel_choices(&dir.join(KERNEL_CHOICES))?,
    })
}

fn read_kernel_choices(f: &Path) -> Result<Option<(BTreeMap<String, String>, String)>> {
    if !f.exists() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?;
    let v: Value = serde_json::from_str(&text)
        .with_context(|| format!("{} is not valid JSON", f.display()))?;
    let choices = serde_json::from_value(v["choices"].clone()).with_context(|| {
        format!(
            "{}: \"choices\" is not an object of kernel names",
            f.display()
        )
    })?;
    let adapter = v["adapter"].as_str().unwrap_or("an unnamed adapter");
    Ok(Some((choices, adapter.to_string())))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A process id that is not running (a child that has exited).
    fn dead_pid() -> u32 {
        let mut c = std::process::Command::new("true").spawn().unwrap();
        let pid = c.id();
        c.wait().unwrap();
        pid
    }

    fn folder(dir: &Path, name: &str, mark: &str) {
        std::fs::create_dir_all(dir.join(name)).unwrap();
        std::fs::write(dir.join(name).join("mark"), mark).unwrap();
    }

    fn mark(dir: &Path, name: &str) -> String {
        std::fs::read_to_string(dir.join(name).join("mark")).unwrap()
    }

    #[cfg(unix)]
    #[test]
    fn a_checkpoint_left_aside_by_a_killed_save_is_put_back() {
        let dir = std::env::temp_dir().join(format!("clipwgpu-aside-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let pid = dead_pid();
        // Killed between the two renames: the old step-4 aside, no new one.
        folder(&dir, &format!(".checkpoint-4.old-{pid}"), "old 4");
        // Killed after the new step-6 was renamed in: the old one is stale.
        folder(&dir, "checkpoint-6", "new 6");
        folder(&dir, &format!(".checkpoint-6.old-{pid}"), "old 6");
        // A save cut short.
        folder(&dir, &format!(".checkpoint-8.tmp-{pid}"), "part 8");
        let done = remove_stale_temp(&dir);
        assert_eq!(done.len(), 3, "{done:?}");
        assert_eq!(mark(&dir, "checkpoint-4"), "old 4");
        assert_eq!(mark(&dir, "checkpoint-6"), "new 6");
        let mut left: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
            .collect();
        left.sort();
        assert_eq!(left, ["checkpoint-4", "checkpoint-6"]);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

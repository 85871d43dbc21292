//! The `clip-wgpu train` command line: run_clip.py's flags as
//! `HfArgumentParser` reads them (its `ModelArguments`,
//! `DataTrainingArguments` and transformers' `TrainingArguments`), so a
//! command pasted from the transformers example runs unchanged.
//!
//! Syntax, as argparse accepts it:
//! - `--name value` and `--name=value`; quotes are the shell's business
//!   (`--per_device_train_batch_size="64"` arrives as `...=64`);
//! - booleans bare (`--do_train`), with a value (`--do_train True`,
//!   `--remove_unused_columns=False`; yes/no, true/false, t/f, y/n, 1/0 in any
//!   case), or negated (`--no_remove_unused_columns`);
//! - hyphens and underscores interchangeable in names (`--do-train`);
//! - an unambiguous prefix of a name (`--per_device_train_batch 64`), as
//!   argparse's `allow_abbrev` allows; a note says which flag it was taken as;
//! - a repeated flag: the last value wins (with a note);
//! - a single argument ending in `.json`: a JSON object of flag names and
//!   values, as run_clip.py's `parse_json_file`.
//!
//! `TrainingArguments` fields that mean nothing here (hub, tf32,
//! distributed, dataloader plumbing, reporting integrations...) are accepted
//! with one note each. Options that would change training in a way this crate
//! does not implement (`--optim adafactor`, `--load_best_model_at_end`,
//! `--save_strategy best`, ...) are errors. An unknown flag is an error that
//! names the closest known flags.
//!
//! Rules where run_clip.py is silent or where this crate adds something:
//! - Data: `--dataset_name ydshieh/coco_dataset_script` (or any path whose
//!   last part is `coco_dataset_script[.py]`) with `--data_dir` reads the COCO
//!   2017 layout ([`DataSource::Coco`]); any other `--dataset_name` needs
//!   local `--train_file`/`--validation_file` (there is no Hub access), which
//!   it then yields to, with a note. Without `--dataset_name`: files
//!   ([`DataSource::Files`]), or `--data_dir` alone as a folder of pictures
//!   with `NAME.txt` captions ([`DataSource::Folder`]); `--data_dir`
//!   together with `--train_file`/`--validation_file` and no dataset name is
//!   an error (two data sets named; run_clip.py would silently ignore the
//!   folder). Nothing at all: the built-in demo data ([`DataSource::Demo`]),
//!   which also turns on `--do_train --do_eval` when neither is given.
//! - `--output_dir` defaults to `trainer_output` (transformers 5's default),
//!   or `out/demo` for the built-in demo.
//! - `--warmup_steps` is transformers 5's: an integer count, or a ratio of
//!   the total steps when below 1. transformers 4's `--warmup_ratio` is
//!   accepted too; when both are non-zero `--warmup_steps` wins (with a note),
//!   as in transformers 4.
//! - `--evaluation_strategy` is the old name of `--eval_strategy`;
//!   `--feature_extractor_name` of `--image_processor_name`;
//!   `--per_gpu_*_batch_size` of `--per_device_*_batch_size`;
//!   `--disable_tqdm` of `--no_progress`.
//! - `--resume_from_checkpoint True` (any boolean-true spelling) means the
//!   latest `checkpoint-N` in `--output_dir`; a false spelling means none.
//! - `--save_total_limit 0` means no limit (the Trainer only rotates for > 0).
//!
//! Paths are not touched while parsing; [`TrainArgs::check_paths`] checks
//! them and explains the no-Hub situation for names that are not local.

use super::accumulate::AccumulationLoss;
use super::schedule::Schedule;
use crate::precision::Precision;
use anyhow::{anyhow, bail, ensure, Context, Result};
use serde_json::{json, Map, Value};
use std::path::{Path, PathBuf};

/// transformers 5's `output_dir` default.
pub const DEFAULT_OUTPUT_DIR: &str = "trainer_output";
/// `output_dir` default for the built-in demo.
pub const DEMO_OUTPUT_DIR: &str = "out/demo";
/// The dataset script of the transformers example's COCO recipe.
pub const COCO_DATASET_SCRIPT: &str = "ydshieh/coco_dataset_script";

/// `--logging_strategy`, `--eval_strategy`, `--save_strategy`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IntervalStrategy {
    No,
    Steps,
    Epoch,
}

impl IntervalStrategy {
    pub fn as_str(self) -> &'static str {
        match self {
            IntervalStrategy::No => "no",
            IntervalStrategy::Steps => "steps",
            IntervalStrategy::Epoch => "epoch",
        }
    }
}

/// Where the examples come from (see the module docs for the rules).
#[derive(Clone, Debug, PartialEq)]
pub enum DataSource {
    /// COCO captions layout under `data_dir` (`annotations/captions_*.json`,
    /// `train2017/`, `val2017/`); `config` is `--dataset_config_name`
    /// ("2017" when not given).
    Coco { data_dir: PathBuf, config: String },
    /// CSV / JSON-lines tables (`--train_file`, `--validation_file`).
    Files {
        train: Option<PathBuf>,
        validation: Option<PathBuf>,
    },
    /// A folder tree of pictures with `NAME.txt` captions (`--data_dir`
    /// without `--dataset_name`).
    Folder { dir: PathBuf },
    /// The built-in demo data.
    Demo,
}

/// What `--resume_from_checkpoint` asks for.
#[derive(Clone, Debug, PartialEq)]
pub enum Resume {
    /// The newest `checkpoint-N` folder in `--output_dir`.
    Latest,
    /// This checkpoint folder.
    Path(PathBuf),
}

/// Every setting of a `clip-wgpu train` run. Field names are the flag names;
/// defaults are transformers' (see [`TrainArgs::default`]).
#[derive(Clone, Debug, PartialEq)]
pub struct TrainArgs {
    // run_clip.py ModelArguments
    pub model_name_or_path: Option<PathBuf>,
    pub config_name: Option<PathBuf>,
    pub tokenizer_name: Option<PathBuf>,
    pub image_processor_name: Option<PathBuf>,
    pub freeze_vision_model: bool,
    pub freeze_text_model: bool,

    // run_clip.py DataTrainingArguments
    pub dataset_name: Option<String>,
    pub dataset_config_name: Option<String>,
    pub data_dir: Option<PathBuf>,
    pub image_column: String,
    pub caption_column: String,
    pub train_file: Option<PathBuf>,
    pub validation_file: Option<PathBuf>,
    pub test_file: Option<PathBuf>,
    pub max_seq_length: usize,
    pub max_train_samples: Option<usize>,
    pub max_eval_samples: Option<usize>,

    // TrainingArguments
    pub output_dir: PathBuf,
    pub overwrite_output_dir: bool,
    pub do_train: bool,
    pub do_eval: bool,
    pub do_predict: bool,
    pub per_device_train_batch_size: usize,
    pub per_device_eval_batch_size: usize,
    pub gradient_accumulation_steps: usize,
    /// What the loss of an accumulation group is: one contrastive loss over
    /// all its pairs (default), or each micro-batch's own (the Trainer's).
    pub accumulation_loss: AccumulationLoss,
    /// Recompute each encoder layer's activations in the backward.
    pub gradient_checkpointing: bool,
    pub learning_rate: f64,
    pub weight_decay: f64,
    pub adam_beta1: f64,
    pub adam_beta2: f64,
    pub adam_epsilon: f64,
    /// Clip the global gradient norm to this; <= 0 disables clipping (the
    /// Trainer clips only when `max_grad_norm > 0`).
    pub max_grad_norm: f64,
    pub num_train_epochs: f64,
    /// > 0 overrides `num_train_epochs`; < 0 (default -1): epoch based.
    pub max_steps: i64,
    /// One of [`super::schedule::SCHEDULER_TYPES`].
    pub lr_scheduler_type: String,
    /// `--lr_scheduler_kwargs '{"num_cycles": 2}'` (empty by default).
    pub lr_scheduler_kwargs: Map<String, Value>,
    /// transformers 5: an integer count (>= 1) or a ratio of the total steps
    /// (< 1). See [`TrainArgs::warmup_steps_for`].
    pub warmup_steps: f64,
    /// transformers 4's ratio; used only when `warmup_steps` is 0.
    pub warmup_ratio: f64,
    pub logging_strategy: IntervalStrategy,
    /// An integer count, or a ratio of the total steps when below 1.
    pub logging_steps: f64,
    pub logging_first_step: bool,
    pub eval_strategy: IntervalStrategy,
    /// Resolved as the Trainer does: with `eval_strategy == Steps` and no
    /// (or zero) `--eval_steps`, this is `Some(logging_steps)`.
    pub eval_steps: Option<f64>,
    pub eval_on_start: bool,
    pub save_strategy: IntervalStrategy,
    pub save_steps: f64,
    /// `None`: keep every checkpoint (also what `--save_total_limit 0` gives).
    pub save_total_limit: Option<usize>,
    pub save_only_model: bool,
    pub seed: u64,
    /// Seed of the data order; `None`: `seed`.
    pub data_seed: Option<u64>,
    pub dataloader_drop_last: bool,
    /// Kept as given; image decoding uses threads ([`TrainArgs::workers`]).
    pub dataloader_num_workers: usize,
    /// As given (a path, or "true" spellings meaning the latest checkpoint);
    /// false spellings are stored as `None`. See [`TrainArgs::resume`].
    pub resume_from_checkpoint: Option<String>,
    pub ignore_data_skip: bool,
    /// `--fp16` and `--bf16` as given (at most one of them true).
    pub fp16: bool,
    pub bf16: bool,
    /// The run's precision, from `--fp16` / `--bf16` (f32 by default): how
    /// activations are stored; f16 also scales the loss (train::scaler).
    pub precision: Precision,
    /// Format of the final model's floating tensors (`--save_dtype`);
    /// checkpoints stay f32 so that a resume is exact.
    pub save_dtype: Precision,

    // clip-wgpu's own
    /// wgpu backend: vulkan, metal, dx12, gl or all.
    pub backend: Option<String>,
    /// Adapter index as listed by `clip-wgpu info`.
    pub adapter: Option<usize>,
    /// Image decoding threads (default: the number of CPU cores).
    pub workers: usize,
    /// Samples a WebDataset stream's shuffle buffer holds at most.
    pub shuffle_buffer: usize,
    pub demo_train_samples: usize,
    pub demo_eval_samples: usize,
    pub no_progress: bool,
    /// Skip (count and report) optimizer steps whose loss or gradient is
    /// not finite instead of stopping the run.
    pub skip_nonfinite_steps: bool,
    /// With `skip_nonfinite_steps`: stop after this many skipped steps in a
    /// row (a run that only skips would otherwise go on doing nothing);
    /// 0: no limit.
    pub max_consecutive_nonfinite_steps: usize,
    /// Under mpirun: every this many optimizer steps, check that every rank
    /// holds the same weights (one norm per rank); 0: never.
    pub sync_check_steps: usize,
    /// Under mpirun: OpenCLIP's local loss (each rank's rows against all
    /// columns; the same gradient, n x N work instead of N x N).
    pub local_loss: bool,
}

impl Default for TrainArgs {
    /// transformers' defaults (run_clip.py's for its own arguments);
    /// `output_dir` is [`DEFAULT_OUTPUT_DIR`].
    fn default() -> Self {
        TrainArgs {
            model_name_or_path: None,
            config_name: None,
            tokenizer_name: None,
            image_processor_name: None,
            freeze_vision_model: false,
            freeze_text_model: false,
            dataset_name: None,
            dataset_config_name: None,
            data_dir: None,
            image_column: "image_path".into(),
            caption_column: "caption".into(),
            train_file: None,
            validation_file: None,
            test_file: None,
            max_seq_length: 128,
            max_train_samples: None,
            max_eval_samples: None,
            output_dir: PathBuf::from(DEFAULT_OUTPUT_DIR),
            overwrite_output_dir: false,
            do_train: false,
            do_eval: false,
            do_predict: false,
            per_device_train_batch_size: 8,
            per_device_eval_batch_size: 8,
            gradient_accumulation_steps: 1,
            accumulation_loss: AccumulationLoss::Full,
            gradient_checkpointing: false,
            learning_rate: 5e-5,
            weight_decay: 0.0,
            adam_beta1: 0.9,
            adam_beta2: 0.999,
            adam_epsilon: 1e-8,
            max_grad_norm: 1.0,
            num_train_epochs: 3.0,
            max_steps: -1,
            lr_scheduler_type: "linear".into(),
            lr_scheduler_kwargs: Map::new(),
            warmup_steps: 0.0,
            warmup_ratio: 0.0,
            logging_strategy: IntervalStrategy::Steps,
            logging_steps: 500.0,
            logging_first_step: false,
            eval_strategy: IntervalStrategy::No,
            eval_steps: None,
            eval_on_start: false,
            save_strategy: IntervalStrategy::Steps,
            save_steps: 500.0,
            save_total_limit: None,
            save_only_model: false,
            seed: 42,
            data_seed: None,
            dataloader_drop_last: false,
            dataloader_num_workers: 0,
            resume_from_checkpoint: None,
            ignore_data_skip: false,
            fp16: false,
            bf16: false,
            precision: Precision::F32,
            save_dtype: Precision::F32,
            backend: None,
            adapter: None,
            workers: std::thread::available_parallelism().map_or(1, |n| n.get()),
            shuffle_buffer: crate::data::webdataset::DEFAULT_SHUFFLE_BUFFER,
            demo_train_samples: 512,
            demo_eval_samples: 128,
            no_progress: false,
            skip_nonfinite_steps: false,
            max_consecutive_nonfinite_steps: 10,
            sync_check_steps: 0,
            local_loss: false,
        }
    }
}

fn is_coco_script(name: &str) -> bool {
    let last = name
        .trim_end_matches(['/', '\\'])
        .rsplit(['/', '\\'])
        .next()
        .unwrap_or("");
    last.trim_end_matches(".py") == "coco_dataset_script"
}

fn ceil_steps(total: usize, ratio: f64) -> usize {
    // math.ceil(total * ratio), computed in f64 as Python does.
    (total as f64 * ratio).ceil().max(0.0) as usize
}

impl TrainArgs {
    /// Where the examples come from. Pure: no file is opened (see
    /// [`TrainArgs::check_paths`]).
    pub fn data_source(&self) -> Result<DataSource> {
        let have_files = self.train_file.is_some() || self.validation_file.is_some();
        if let Some(name) = &self.dataset_name {
            if is_coco_script(name) {
                let Some(dir) = &self.data_dir else {
                    bail!(
                        "--dataset_name {name} reads COCO from a local folder: give --data_dir with \
                         annotations/captions_train2017.json, annotations/captions_val2017.json, \
                         train2017/ and val2017/ (the layout the transformers example downloads)"
                    );
                };
                let config = self
                    .dataset_config_name
                    .clone()
                    .unwrap_or_else(|| "2017".into());
                ensure!(
                    config == "2017",
                    "--dataset_config_name {config}: only the COCO 2017 layout is supported \
                     (captions_{{train,val}}2017.json)"
                );
                return Ok(DataSource::Coco {
                    data_dir: dir.clone(),
                    config,
                });
            }
            ensure!(
                have_files,
                "--dataset_name {name}: there is no Hugging Face Hub access here, so only local data can be \
                 read: --dataset_name {COCO_DATASET_SCRIPT} --data_dir <COCO folder>, or \
                 --train_file/--validation_file (CSV or JSON lines with the --image_column and \
                 --caption_column columns), or --data_dir <folder of pictures with NAME.txt captions>"
            );
            // Falls through to the files, with a note from parse().
        }
        if have_files {
            if self.dataset_name.is_none() {
                if let Some(dir) = &self.data_dir {
                    bail!(
                        "--data_dir {} and --train_file/--validation_file name two different data sets; \
                         give the files, or --data_dir alone (a folder of pictures with NAME.txt captions), \
                         or --dataset_name {COCO_DATASET_SCRIPT} --data_dir <COCO folder>",
                        dir.display()
                    );
                }
            }
            return Ok(DataSource::Files {
                train: self.train_file.clone(),
                validation: self.validation_file.clone(),
            });
        }
        if let Some(dir) = &self.data_dir {
            return Ok(DataSource::Folder { dir: dir.clone() });
        }
        Ok(DataSource::Demo)
    }

    /// `--resume_from_checkpoint`, interpreted.
    pub fn resume(&self) -> Option<Resume> {
        let v = self.resume_from_checkpoint.as_deref()?;
        match parse_bool(v) {
            Ok(true) => Some(Resume::Latest),
            Ok(false) => None,
            Err(_) => Some(Resume::Path(PathBuf::from(v))),
        }
    }

    /// Batches in one pass over `n_samples` training examples (the
    /// DataLoader's length: rounded up, or down with `--dataloader_drop_last`).
    pub fn batches_per_epoch(&self, n_samples: usize) -> usize {
        let b = self.per_device_train_batch_size.max(1);
        if self.dataloader_drop_last {
            n_samples / b
        } else {
            n_samples.div_ceil(b)
        }
    }

    /// Optimizer steps per epoch: `max(ceil(batches / grad_accum), 1)`
    /// (Trainer.set_initial_training_values).
    pub fn update_steps_per_epoch(&self, batches_per_epoch: usize) -> usize {
        batches_per_epoch
            .div_ceil(self.gradient_accumulation_steps.max(1))
            .max(1)
    }

    /// Total optimizer steps: `max_steps` if > 0, else
    /// `ceil(num_train_epochs * update_steps_per_epoch)` (0 for
    /// `max_steps == 0`, as in the Trainer).
    pub fn total_steps(&self, batches_per_epoch: usize) -> usize {
        let per_epoch = self.update_steps_per_epoch(batches_per_epoch);
        if self.max_steps < 0 {
            (self.num_train_epochs * per_epoch as f64).ceil().max(0.0) as usize
        } else {
            self.max_steps as usize
        }
    }

    /// Epochs the training loop runs (the Trainer's integer
    /// `num_train_epochs`): `ceil(max_steps / update_steps_per_epoch)` with
    /// `--max_steps`, else `ceil(num_train_epochs)`.
    pub fn num_epochs(&self, batches_per_epoch: usize) -> usize {
        let per_epoch = self.update_steps_per_epoch(batches_per_epoch);
        if self.max_steps > 0 {
            (self.max_steps as usize).div_ceil(per_epoch)
        } else {
            self.num_train_epochs.ceil().max(0.0) as usize
        }
    }

    /// Warmup steps for a run of `total` optimizer steps
    /// (`TrainingArguments.get_warmup_steps`): `int(warmup_steps)` when >= 1,
    /// else `ceil(total * warmup_steps)`; when `warmup_steps` is 0,
    /// transformers 4's `ceil(total * warmup_ratio)`.
    pub fn warmup_steps_for(&self, total: usize) -> usize {
        if self.warmup_steps >= 1.0 {
            self.warmup_steps as usize
        } else if self.warmup_steps > 0.0 {
            ceil_steps(total, self.warmup_steps)
        } else {
            ceil_steps(total, self.warmup_ratio)
        }
    }

    fn steps_for(x: f64, total: usize) -> usize {
        // TrainerState.compute_steps: ratios below 1 are of the total steps.
        if x < 1.0 {
            ceil_steps(total, x)
        } else {
            x as usize
        }
    }

    /// Optimizer steps between logs (ratios resolved against `total`).
    pub fn logging_steps_for(&self, total: usize) -> usize {
        Self::steps_for(self.logging_steps, total)
    }

    /// Optimizer steps between evaluations with `eval_strategy == Steps`.
    pub fn eval_steps_for(&self, total: usize) -> usize {
        Self::steps_for(self.eval_steps.unwrap_or(self.logging_steps), total)
    }

    /// Optimizer steps between checkpoints with `save_strategy == Steps`.
    pub fn save_steps_for(&self, total: usize) -> usize {
        Self::steps_for(self.save_steps, total)
    }

    /// Whether to evaluate during training (`--eval_strategy` steps or
    /// epoch), besides the final evaluation of `--do_eval`.
    pub fn evaluates_during_training(&self) -> bool {
        self.eval_strategy != IntervalStrategy::No
    }

    /// The data-order seed (`--data_seed`, else `--seed`).
    pub fn data_seed(&self) -> u64 {
        self.data_seed.unwrap_or(self.seed)
    }

    /// Check that the local paths exist, with messages that say what each
    /// flag should point at and that nothing is fetched from the Hub.
    pub fn check_paths(&self) -> Result<()> {
        fn hub_hint(flag: &str, p: &Path, what: &str) -> anyhow::Error {
            let s = p.to_string_lossy();
            let looks_hub = !p.is_absolute() && s.matches('/').count() == 1 && !s.starts_with('.');
            if looks_hub {
                anyhow!(
                    "--{flag} {s}: no such local {what}, and there is no Hugging Face Hub access here; \
                     download it first (e.g. `huggingface-cli download {s} --local-dir <dir>`) and pass the folder"
                )
            } else {
                anyhow!("--{flag} {s}: no such {what}")
            }
        }
        let folder_or_file = |flag: &str, p: &Option<PathBuf>, what: &str| -> Result<()> {
            match p {
                Some(p) if !p.exists() => Err(hub_hint(flag, p, what)),
                _ => Ok(()),
            }
        };
        if let Some(m) = &self.model_name_or_path {
            if !m.is_dir() {
                return Err(hub_hint("model_name_or_path", m, "model folder"));
            }
        }
        folder_or_file("config_name", &self.config_name, "config file or folder")?;
        folder_or_file(
            "tokenizer_name",
            &self.tokenizer_name,
            "tokenizer file or folder",
        )?;
        folder_or_file(
            "image_processor_name",
            &self.image_processor_name,
            "preprocessor config file or folder",
        )?;
        match self.data_source()? {
            DataSource::Coco { data_dir, .. } => {
                ensure!(
                    data_dir.is_dir(),
                    "--data_dir {}: no such folder",
                    data_dir.display()
                );
            }
            DataSource::Folder { dir } => {
                ensure!(dir.is_dir(), "--data_dir {}: no such folder", dir.display());
            }
            DataSource::Files { train, validation } => {
                for (flag, f) in [("train_file", train), ("validation_file", validation)] {
                    if let Some(f) = f {
                        if crate::data::webdataset::is_shard_spec(&f) {
                            crate::data::webdataset::expand_shards(&f)
                                .with_context(|| format!("--{flag} {}", f.display()))?;
                        } else {
                            ensure!(f.is_file(), "--{flag} {}: no such file", f.display());
                        }
                    }
                }
            }
            DataSource::Demo => {}
        }
        if let Some(Resume::Path(p)) = self.resume() {
            ensure!(
                p.is_dir(),
                "--resume_from_checkpoint {}: no such checkpoint folder",
                p.display()
            );
        }
        ensure!(
            !self.output_dir.exists() || self.output_dir.is_dir(),
            "--output_dir {}: exists and is not a folder",
            self.output_dir.display()
        );
        Ok(())
    }

    /// Every setting as a JSON object (flag name -> value), for a run's
    /// record of how it was started.
    pub fn to_json(&self) -> Value {
        let p = |x: &Option<PathBuf>| x.as_ref().map(|p| p.to_string_lossy().into_owned());
        let mut m = Map::new();
        let mut put = |k: &str, v: Value| {
            m.insert(k.to_string(), v);
        };
        put("model_name_or_path", json!(p(&self.model_name_or_path)));
        put("config_name", json!(p(&self.config_name)));
        put("tokenizer_name", json!(p(&self.tokenizer_name)));
        put("image_processor_name", json!(p(&self.image_processor_name)));
        put("freeze_vision_model", json!(self.freeze_vision_model));
        put("freeze_text_model", json!(self.freeze_text_model));
        put("dataset_name", json!(self.dataset_name));
        put("dataset_config_name", json!(self.dataset_config_name));
        put("data_dir", json!(p(&self.data_dir)));
        put("image_column", json!(self.image_column));
        put("caption_column", json!(self.caption_column));
        put("train_file", json!(p(&self.train_file)));
        put("validation_file", json!(p(&self.validation_file)));
        put("test_file", json!(p(&self.test_file)));
        put("max_seq_length", json!(self.max_seq_length));
        put("max_train_samples", json!(self.max_train_samples));
        put("max_eval_samples", json!(self.max_eval_samples));
        put("output_dir", json!(self.output_dir.to_string_lossy()));
        put("overwrite_output_dir", json!(self.overwrite_output_dir));
        put("do_train", json!(self.do_train));
        put("do_eval", json!(self.do_eval));
        put("do_predict", json!(self.do_predict));
        put(
            "per_device_train_batch_size",
            json!(self.per_device_train_batch_size),
        );
        put(
            "per_device_eval_batch_size",
            json!(self.per_device_eval_batch_size),
        );
        put(
            "gradient_accumulation_steps",
            json!(self.gradient_accumulation_steps),
        );
        put("accumulation_loss", json!(self.accumulation_loss.as_str()));
        put("gradient_checkpointing", json!(self.gradient_checkpointing));
        put("learning_rate", json!(self.learning_rate));
        put("weight_decay", json!(self.weight_decay));
        put("adam_beta1", json!(self.adam_beta1));
        put("adam_beta2", json!(self.adam_beta2));
        put("adam_epsilon", json!(self.adam_epsilon));
        put("max_grad_norm", json!(self.max_grad_norm));
        put("num_train_epochs", json!(self.num_train_epochs));
        put("max_steps", json!(self.max_steps));
        put("lr_scheduler_type", json!(self.lr_scheduler_type));
        put("lr_scheduler_kwargs", json!(self.lr_scheduler_kwargs));
        put("warmup_steps", json!(self.warmup_steps));
        put("warmup_ratio", json!(self.warmup_ratio));
        put("logging_strategy", json!(self.logging_strategy.as_str()));
        put("logging_steps", json!(self.logging_steps));
        put("logging_first_step", json!(self.logging_first_step));
        put("eval_strategy", json!(self.eval_strategy.as_str()));
        put("eval_steps", json!(self.eval_steps));
        put("eval_on_start", json!(self.eval_on_start));
        put("save_strategy", json!(self.save_strategy.as_str()));
        put("save_steps", json!(self.save_steps));
        put("save_total_limit", json!(self.save_total_limit));
        put("save_only_model", json!(self.save_only_model));
        put("seed", json!(self.seed));
        put("data_seed", json!(self.data_seed));
        put("dataloader_drop_last", json!(self.dataloader_drop_last));
        put("dataloader_num_workers", json!(self.dataloader_num_workers));
        put("resume_from_checkpoint", json!(self.resume_from_checkpoint));
        put("ignore_data_skip", json!(self.ignore_data_skip));
        put("fp16", json!(self.fp16));
        put("bf16", json!(self.bf16));
        put("precision", json!(self.precision.name()));
        put("save_dtype", json!(self.save_dtype.name()));
        put("backend", json!(self.backend));
        put("adapter", json!(self.adapter));
        put("workers", json!(self.workers));
        put("shuffle_buffer", json!(self.shuffle_buffer));
        put("demo_train_samples", json!(self.demo_train_samples));
        put("demo_eval_samples", json!(self.demo_eval_samples));
        put("no_progress", json!(self.no_progress));
        put("skip_nonfinite_steps", json!(self.skip_nonfinite_steps));
        put(
            "max_consecutive_nonfinite_steps",
            json!(self.max_consecutive_nonfinite_steps),
        );
        put("sync_check_steps", json!(self.sync_check_steps));
        put("local_loss", json!(self.local_loss));
        Value::Object(m)
    }
}

// ---------------------------------------------------------------------------
// Value parsing (messages name the value; the caller prefixes the flag).

/// transformers' `string_to_bool`.
fn parse_bool(v: &str) -> Result<bool> {
    match v.to_ascii_lowercase().as_str() {
        "yes" | "true" | "t" | "y" | "1" => Ok(true),
        "no" | "false" | "f" | "n" | "0" => Ok(false),
        _ => bail!("expected a boolean (true/false, yes/no, t/f, y/n, 1/0), got '{v}'"),
    }
}

fn parse_usize(v: &str) -> Result<usize> {
    v.trim()
        .parse::<usize>()
        .map_err(|_| anyhow!("expected a whole number >= 0, got '{v}'"))
}

fn parse_u64(v: &str) -> Result<u64> {
    v.trim()
        .parse::<u64>()
        .map_err(|_| anyhow!("expected a whole number >= 0, got '{v}'"))
}

fn parse_i64(v: &str) -> Result<i64> {
    v.trim()
        .parse::<i64>()
        .map_err(|_| anyhow!("expected a whole number, got '{v}'"))
}

fn parse_f64(v: &str) -> Result<f64> {
    match v.trim().parse::<f64>() {
        Ok(x) if x.is_finite() => Ok(x),
        _ => bail!("expected a finite number, got '{v}'"),
    }
}

fn parse_path(v: &str) -> Result<PathBuf> {
    ensure!(!v.is_empty(), "expected a path, got an empty value");
    Ok(PathBuf::from(v))
}

fn parse_text(v: &str) -> Result<String> {
    ensure!(!v.is_empty(), "expected a value, got an empty one");
    Ok(v.to_string())
}

fn parse_strategy(v: &str, allow_best: bool) -> Result<IntervalStrategy> {
    match v.trim().to_ascii_lowercase().as_str() {
        "no" => Ok(IntervalStrategy::No),
        "steps" => Ok(IntervalStrategy::Steps),
        "epoch" => Ok(IntervalStrategy::Epoch),
        "best" if allow_best => bail!(
            "'best' saves only on a new best eval metric (with --metric_for_best_model); not supported here, \
             use steps or epoch"
        ),
        _ => bail!(
            "expected one of no, steps, epoch{}, got '{v}'",
            if allow_best { ", best" } else { "" }
        ),
    }
}

// ---------------------------------------------------------------------------
// The flag table.

type Setter = fn(&mut TrainArgs, &str) -> Result<()>;

#[derive(Clone, Copy, PartialEq)]
enum Takes {
    /// A boolean: bare, or one value.
    Bool,
    /// Exactly one value.
    One,
    /// Accepted and ignored: takes every following token that is not a flag
    /// (bare booleans, single values and lists alike).
    Any,
}

#[derive(Clone, Copy)]
enum Act {
    Set(Setter),
    /// No effect here: the note's reason.
    Note(&'static str),
    /// Another name for this flag.
    Alias(&'static str),
}

struct Spec {
    name: &'static str,
    takes: Takes,
    act: Act,
    help: &'static str,
}

const fn set(name: &'static str, takes: Takes, f: Setter, help: &'static str) -> Spec {
    Spec {
        name,
        takes,
        act: Act::Set(f),
        help,
    }
}

const fn note(name: &'static str, why: &'static str) -> Spec {
    Spec {
        name,
        takes: Takes::Any,
        act: Act::Note(why),
        help: "",
    }
}

const fn alias(name: &'static str, takes: Takes, to: &'static str) -> Spec {
    Spec {
        name,
        takes,
        act: Act::Alias(to),
        help: "",
    }
}

const HUB: &str =
    "there is no Hugging Face Hub access here; models and data are read from local paths";
const PRECISION: &str =
    "the precision is set by --fp16 or --bf16 alone (f32 master weights, optimizer state and \
     arithmetic; f16 with PyTorch AMP's dynamic loss scaling) and evaluation runs as training does";
const ONE_DEVICE: &str =
    "each process trains on one wgpu adapter (see --backend, --adapter); for several, build with \
     --features mpi and start the job with mpirun -n N (see the README)";
const NO_COMPILE: &str =
    "the kernels are hand-written WGSL; there is nothing to compile or swap in";
const REPORTING: &str =
    "metrics go to the console and to the JSON-lines log and loss chart in --output_dir";
const PIPELINE: &str =
    "batches are built directly from the image and caption columns, decoded on the fly";
const DEVICE: &str = "the device is a wgpu adapter: pick it with --backend and --adapter";
const MEMORY: &str =
    "memory is managed by the buffer pool; see --gradient_checkpointing and --gradient_accumulation_steps";
const BEST: &str = "it only matters with --load_best_model_at_end or --save_strategy best, which are not supported";

use Takes::{Bool, One};

// One flag per entry; kept as a table rather than rustfmt's layout.
#[rustfmt::skip]
static SPECS: &[Spec] = &[
    // ---- run_clip.py ModelArguments
    set("model_name_or_path", One, |a, v| { a.model_name_or_path = Some(parse_path(v)?); Ok(()) },
        "Model folder (config.json, model.safetensors, tokenizer and preprocessor files). Without it: the built-in demo model."),
    set("config_name", One, |a, v| { a.config_name = Some(parse_path(v)?); Ok(()) },
        "Model config (config.json or its folder), if not the model's."),
    set("tokenizer_name", One, |a, v| { a.tokenizer_name = Some(parse_path(v)?); Ok(()) },
        "Tokenizer (tokenizer.json or its folder), if not the model's."),
    set("image_processor_name", One, |a, v| { a.image_processor_name = Some(parse_path(v)?); Ok(()) },
        "Image processor (preprocessor_config.json or its folder), if not the model's."),
    alias("feature_extractor_name", One, "image_processor_name"),
    set("freeze_vision_model", Bool, |a, v| { a.freeze_vision_model = parse_bool(v)?; Ok(()) },
        "Do not train the vision tower. Default false."),
    set("freeze_text_model", Bool, |a, v| { a.freeze_text_model = parse_bool(v)?; Ok(()) },
        "Do not train the text tower. Default false."),
    note("cache_dir", HUB),
    note("model_revision", HUB),
    note("token", HUB),
    note("use_auth_token", HUB),
    note("trust_remote_code", "no remote code is ever run; the model towers are implemented here"),
    note("use_fast_tokenizer", "the tokenizer is always the fast one (the Hugging Face tokenizers library)"),
    // ---- run_clip.py DataTrainingArguments
    set("dataset_name", One, |a, v| { a.dataset_name = Some(parse_text(v)?); Ok(()) },
        "ydshieh/coco_dataset_script (with --data_dir: the COCO 2017 layout). No Hub access: other names need local files."),
    set("dataset_config_name", One, |a, v| { a.dataset_config_name = Some(parse_text(v)?); Ok(()) },
        "Dataset configuration; for COCO only 2017."),
    set("data_dir", One, |a, v| { a.data_dir = Some(parse_path(v)?); Ok(()) },
        "COCO folder (with --dataset_name ydshieh/coco_dataset_script), or alone a folder of pictures with NAME.txt captions."),
    set("image_column", One, |a, v| { a.image_column = parse_text(v)?; Ok(()) },
        "Column of image file paths. Default image_path."),
    set("caption_column", One, |a, v| { a.caption_column = parse_text(v)?; Ok(()) },
        "Column of captions. Default caption."),
    set("train_file", One, |a, v| { a.train_file = Some(parse_path(v)?); Ok(()) },
        "Training table: CSV or JSON lines; or WebDataset tar shards: 'data/{00000..00099}.tar', a glob, or a list file (.list/.shards, one shard a line)."),
    set("validation_file", One, |a, v| { a.validation_file = Some(parse_path(v)?); Ok(()) },
        "Validation table: CSV or JSON lines; or WebDataset shards as for --train_file (read in order)."),
    set("test_file", One, |a, v| { a.test_file = Some(parse_path(v)?); Ok(()) },
        "Accepted; like run_clip.py, nothing runs on it."),
    set("max_seq_length", One, |a, v| { a.max_seq_length = parse_usize(v)?; Ok(()) },
        "Captions are padded/truncated to this many tokens. Default 128."),
    set("max_train_samples", One, |a, v| { a.max_train_samples = Some(parse_usize(v)?); Ok(()) },
        "Use only the first N training examples."),
    set("max_eval_samples", One, |a, v| { a.max_eval_samples = Some(parse_usize(v)?); Ok(()) },
        "Use only the first N evaluation examples."),
    note("overwrite_cache", "nothing is cached: captions are tokenized and images decoded on the fly"),
    note("preprocessing_num_workers", "tokenizing is done on the fly; use --workers for image decoding threads"),
    // ---- TrainingArguments
    set("output_dir", One, |a, v| { a.output_dir = parse_path(v)?; Ok(()) },
        "Where checkpoints, the final model, logs and the loss chart go. Default trainer_output (out/demo for the demo)."),
    set("overwrite_output_dir", Bool, |a, v| { a.overwrite_output_dir = parse_bool(v)?; Ok(()) },
        "Train from scratch even if --output_dir holds checkpoints. Default false."),
    set("do_train", Bool, |a, v| { a.do_train = parse_bool(v)?; Ok(()) }, "Train. Default false."),
    set("do_eval", Bool, |a, v| { a.do_eval = parse_bool(v)?; Ok(()) },
        "Evaluate on the validation split (loss, recall@K) after training. Default false."),
    set("do_predict", Bool, |a, v| { a.do_predict = parse_bool(v)?; Ok(()) },
        "Accepted; like run_clip.py, nothing runs on the test split."),
    set("per_device_train_batch_size", One, |a, v| { a.per_device_train_batch_size = parse_usize(v)?; Ok(()) },
        "Training batch size. Default 8."),
    alias("per_gpu_train_batch_size", One, "per_device_train_batch_size"),
    set("per_device_eval_batch_size", One, |a, v| { a.per_device_eval_batch_size = parse_usize(v)?; Ok(()) },
        "Evaluation batch size. Default 8."),
    alias("per_gpu_eval_batch_size", One, "per_device_eval_batch_size"),
    set("gradient_accumulation_steps", One, |a, v| { a.gradient_accumulation_steps = parse_usize(v)?; Ok(()) },
        "Batches per optimizer step; with --accumulation_loss full (the default) their contrastive loss is one over all of them, exactly as one batch of N x the batch size. Default 1."),
    set("accumulation_loss", One, |a, v| { a.accumulation_loss = AccumulationLoss::parse(v)?; Ok(()) },
        "full: one contrastive loss over every pair of the accumulated batches (gradient caching: one extra forward per batch); micro: each batch's own loss, averaged (the Hugging Face Trainer's meaning, negatives only within a batch). Default full."),
    set("learning_rate", One, |a, v| { a.learning_rate = parse_f64(v)?; Ok(()) },
        "Peak AdamW learning rate. Default 5e-5."),
    set("weight_decay", One, |a, v| { a.weight_decay = parse_f64(v)?; Ok(()) },
        "AdamW weight decay (not on biases and LayerNorm weights). Default 0."),
    set("adam_beta1", One, |a, v| { a.adam_beta1 = parse_f64(v)?; Ok(()) }, "Default 0.9."),
    set("adam_beta2", One, |a, v| { a.adam_beta2 = parse_f64(v)?; Ok(()) }, "Default 0.999."),
    set("adam_epsilon", One, |a, v| { a.adam_epsilon = parse_f64(v)?; Ok(()) }, "Default 1e-8."),
    set("max_grad_norm", One, |a, v| { a.max_grad_norm = parse_f64(v)?; Ok(()) },
        "Clip the global gradient norm to this (<= 0: no clipping). Default 1."),
    set("num_train_epochs", One, |a, v| { a.num_train_epochs = parse_f64(v)?; Ok(()) },
        "Epochs (may be fractional). Default 3."),
    set("max_steps", One, |a, v| { a.max_steps = parse_i64(v)?; Ok(()) },
        "If > 0: total optimizer steps, overriding --num_train_epochs. Default -1."),
    set("lr_scheduler_type", One, |a, v| { a.lr_scheduler_type = v.trim().to_string(); Ok(()) },
        "linear, cosine, cosine_with_restarts, polynomial, constant, constant_with_warmup, inverse_sqrt, cosine_with_min_lr. Default linear."),
    set("lr_scheduler_kwargs", One, |a, v| {
            let m = match serde_json::from_str::<Value>(v) {
                Ok(Value::Object(m)) => m,
                _ => bail!("expected a JSON object such as '{{\"num_cycles\": 2}}', got '{v}'"),
            };
            a.lr_scheduler_kwargs = m;
            Ok(())
        },
        "Scheduler parameters as JSON, e.g. '{\"num_cycles\": 2}'."),
    set("warmup_steps", One, |a, v| { a.warmup_steps = parse_f64(v)?; Ok(()) },
        "Linear warmup: a step count, or a ratio of the total steps if below 1. Default 0."),
    set("warmup_ratio", One, |a, v| { a.warmup_ratio = parse_f64(v)?; Ok(()) },
        "transformers 4: warmup as a ratio of the total steps (used when --warmup_steps is 0)."),
    set("logging_strategy", One, |a, v| { a.logging_strategy = parse_strategy(v, false)?; Ok(()) },
        "no, steps or epoch. Default steps."),
    set("logging_steps", One, |a, v| { a.logging_steps = parse_f64(v)?; Ok(()) },
        "Log every N optimizer steps (a ratio of the total if below 1). Default 500."),
    set("logging_first_step", Bool, |a, v| { a.logging_first_step = parse_bool(v)?; Ok(()) },
        "Also log after the first step. Default false."),
    set("eval_strategy", One, |a, v| { a.eval_strategy = parse_strategy(v, false)?; Ok(()) },
        "no, steps or epoch: evaluate during training. Default no."),
    alias("evaluation_strategy", One, "eval_strategy"),
    set("eval_steps", One, |a, v| { a.eval_steps = Some(parse_f64(v)?); Ok(()) },
        "Evaluate every N optimizer steps (a ratio if below 1). Default: --logging_steps."),
    set("eval_on_start", Bool, |a, v| { a.eval_on_start = parse_bool(v)?; Ok(()) },
        "Evaluate once before training. Default false."),
    set("eval_delay", One, |_, v| {
            ensure!(parse_f64(v)? == 0.0, "delaying the first evaluation is not supported here (only 0)");
            Ok(())
        },
        "Only 0."),
    set("save_strategy", One, |a, v| { a.save_strategy = parse_strategy(v, true)?; Ok(()) },
        "no, steps or epoch. Default steps."),
    set("save_steps", One, |a, v| { a.save_steps = parse_f64(v)?; Ok(()) },
        "Checkpoint every N optimizer steps (a ratio if below 1). Default 500."),
    set("save_total_limit", One, |a, v| {
            let n = parse_usize(v)?;
            a.save_total_limit = if n == 0 { None } else { Some(n) };
            Ok(())
        },
        "Keep only the newest N checkpoints. Default: all."),
    set("save_only_model", Bool, |a, v| { a.save_only_model = parse_bool(v)?; Ok(()) },
        "Checkpoints without optimizer state (cannot be resumed). Default false."),
    set("seed", One, |a, v| { a.seed = parse_u64(v)?; Ok(()) }, "Random seed. Default 42."),
    set("data_seed", One, |a, v| { a.data_seed = Some(parse_u64(v)?); Ok(()) },
        "Seed of the data order. Default: --seed."),
    set("dataloader_drop_last", Bool, |a, v| { a.dataloader_drop_last = parse_bool(v)?; Ok(()) },
        "Drop the last incomplete training batch. Default false."),
    set("dataloader_num_workers", One, |a, v| { a.dataloader_num_workers = parse_usize(v)?; Ok(()) },
        "Accepted and kept; decoding threads are set by --workers."),
    set("resume_from_checkpoint", One, |a, v| {
            let v = parse_text(v)?;
            a.resume_from_checkpoint = match parse_bool(&v) {
                Ok(false) => None,
                _ => Some(v),
            };
            Ok(())
        },
        "A checkpoint folder, or true for the newest checkpoint in --output_dir."),
    set("ignore_data_skip", Bool, |a, v| { a.ignore_data_skip = parse_bool(v)?; Ok(()) },
        "On resume, do not skip the batches already seen in the current epoch. Default false."),
    set("optim", One, |_, v| {
            let v = v.trim();
            ensure!(
                matches!(v, "adamw_torch" | "adamw_torch_fused" | "adamw_hf" | "adamw_torch_xla"
                    | "adamw_torch_npu_fused" | "adamw_apex_fused"),
                "only AdamW is implemented here (adamw_torch, adamw_torch_fused), got '{v}'"
            );
            Ok(())
        },
        "adamw_torch or adamw_torch_fused (both are torch.optim.AdamW here)."),
    set("adafactor", Bool, |_, v| {
            ensure!(!parse_bool(v)?, "Adafactor is not implemented here; only AdamW");
            Ok(())
        },
        "transformers 4; only false."),
    set("load_best_model_at_end", Bool, |_, v| {
            ensure!(!parse_bool(v)?, "not supported here; the final model is the last step's");
            Ok(())
        },
        "Only false."),
    note("metric_for_best_model", BEST),
    note("greater_is_better", BEST),
    note("optim_args", "AdamW takes its settings from --adam_beta1, --adam_beta2, --adam_epsilon and --weight_decay"),
    note("label_smoothing_factor", "CLIP's contrastive loss takes no labels, so the Trainer never smooths it for run_clip.py"),
    note("auto_find_batch_size", "the batch size is used as given"),
    note("use_cpu", DEVICE),
    note("no_cuda", DEVICE),
    note("use_mps_device", DEVICE),
    note("full_determinism", "runs are always deterministic (fixed-order GPU reductions, seeded data order)"),
    alias("disable_tqdm", Bool, "no_progress"),
    // precision
    set("fp16", Bool, |a, v| { a.fp16 = parse_bool(v)?; Ok(()) },
        "Mixed precision with f16 activations and PyTorch AMP's dynamic loss scaling (GradScaler: scale \
         2^16, halved on a step with inf/NaN gradients, which is skipped; doubled after 2000 clean steps). \
         Weights, optimizer state and arithmetic stay f32. Not with --bf16. Default false."),
    set("bf16", Bool, |a, v| { a.bf16 = parse_bool(v)?; Ok(()) },
        "Mixed precision with bfloat16 activations (no loss scaling, as in the Trainer). Not with --fp16. \
         Default false."),
    note("fp16_full_eval", PRECISION),
    note("bf16_full_eval", PRECISION),
    note("tf32", "matmuls multiply and accumulate in f32; there is no TF32 mode"),
    note("fp16_opt_level", PRECISION),
    note("fp16_backend", PRECISION),
    note("half_precision_backend", PRECISION),
    // hub
    note("push_to_hub", HUB),
    note("hub_model_id", HUB),
    note("hub_strategy", HUB),
    note("hub_token", HUB),
    note("hub_private_repo", HUB),
    note("hub_always_push", HUB),
    note("hub_revision", HUB),
    note("push_to_hub_model_id", HUB),
    note("push_to_hub_organization", HUB),
    note("push_to_hub_token", HUB),
    // reporting
    note("report_to", REPORTING),
    note("logging_dir", REPORTING),
    note("run_name", REPORTING),
    note("project", REPORTING),
    note("trackio_space_id", REPORTING),
    note("trackio_bucket_id", REPORTING),
    note("trackio_static_space_id", REPORTING),
    note("log_level", REPORTING),
    note("log_level_replica", REPORTING),
    note("log_on_each_node", ONE_DEVICE),
    note("logging_nan_inf_filter", "losses are logged as computed"),
    note("skip_memory_metrics", REPORTING),
    note("include_num_input_tokens_seen", REPORTING),
    note("include_tokens_per_second", REPORTING),
    // data pipeline
    note("remove_unused_columns", PIPELINE),
    note("label_names", PIPELINE),
    note("include_for_metrics", PIPELINE),
    note("include_inputs_for_metrics", PIPELINE),
    note("group_by_length", PIPELINE),
    note("length_column_name", PIPELINE),
    note("train_sampling_strategy", PIPELINE),
    note("dataloader_pin_memory", PIPELINE),
    note("dataloader_persistent_workers", PIPELINE),
    note("dataloader_prefetch_factor", PIPELINE),
    note("dataloader_multiprocessing_context", PIPELINE),
    note("dataloader_in_order", PIPELINE),
    note("eval_do_concat_batches", PIPELINE),
    note("eval_use_gather_object", ONE_DEVICE),
    note("batch_eval_metrics", PIPELINE),
    note("prediction_loss_only", "evaluation always reports the loss and recall@K"),
    note("eval_accumulation_steps", PIPELINE),
    note("past_index", PIPELINE),
    note("use_legacy_prediction_loop", PIPELINE),
    // distributed
    note("local_rank", ONE_DEVICE),
    note("ddp_find_unused_parameters", ONE_DEVICE),
    note("ddp_bucket_cap_mb", ONE_DEVICE),
    note("ddp_broadcast_buffers", ONE_DEVICE),
    note("ddp_static_graph", ONE_DEVICE),
    note("ddp_backend", ONE_DEVICE),
    note("ddp_timeout", ONE_DEVICE),
    note("fsdp", ONE_DEVICE),
    note("fsdp_config", ONE_DEVICE),
    note("fsdp_min_num_params", ONE_DEVICE),
    note("fsdp_transformer_layer_cls_to_wrap", ONE_DEVICE),
    note("deepspeed", ONE_DEVICE),
    note("accelerator_config", ONE_DEVICE),
    note("parallelism_config", ONE_DEVICE),
    note("save_on_each_node", ONE_DEVICE),
    note("tpu_num_cores", ONE_DEVICE),
    note("tpu_metrics_debug", ONE_DEVICE),
    note("average_tokens_across_devices", ONE_DEVICE),
    note("sharded_ddp", ONE_DEVICE),
    note("xpu_backend", ONE_DEVICE),
    note("mp_parameters", ONE_DEVICE),
    note("ray_scope", ONE_DEVICE),
    // compilation, kernels
    note("torch_compile", NO_COMPILE),
    note("torch_compile_backend", NO_COMPILE),
    note("torch_compile_mode", NO_COMPILE),
    note("torchdynamo", NO_COMPILE),
    note("jit_mode_eval", NO_COMPILE),
    note("use_ipex", NO_COMPILE),
    note("use_liger_kernel", NO_COMPILE),
    note("liger_kernel_config", NO_COMPILE),
    // memory
    set("gradient_checkpointing", Bool, |a, v| { a.gradient_checkpointing = parse_bool(v)?; Ok(()) },
        "Keep only each encoder layer's input in the forward and recompute the layer in the backward: less activation memory for about one more forward. Default false."),
    alias("activation_checkpointing", Bool, "gradient_checkpointing"),
    note("gradient_checkpointing_kwargs", "checkpointing is per encoder layer, with no options"),
    note("activation_checkpointing_kwargs", "checkpointing is per encoder layer, with no options"),
    note("torch_empty_cache_steps", MEMORY),
    // checkpoints and the rest
    note("save_safetensors", "weights are always saved as safetensors"),
    set("save_dtype", One, |a, v| { a.save_dtype = Precision::parse(v)?; Ok(()) },
        "Floating format of the final model in --output_dir: f32, f16 or bf16 (rounded to nearest even; \
         config.json's dtype says which). Checkpoints stay f32 so that a resume is exact. Default f32."),
    note("enable_jit_checkpoint", "checkpoints are written at --save_steps / --save_strategy only"),
    note("restore_callback_states_from_checkpoint", "there are no Trainer callbacks here"),
    note("neftune_noise_alpha", "NEFTune is for language-model fine-tuning; not applied to CLIP"),
    note("use_cache", "there is no generation cache in CLIP"),
    note("optim_target_modules", "AdamW updates every trainable parameter"),
    note("debug", REPORTING),
    // ---- clip-wgpu's own
    set("backend", One, |a, v| { a.backend = Some(parse_text(v)?); Ok(()) },
        "wgpu backend: vulkan, metal, dx12, gl or all (env CLIP_WGPU_BACKEND)."),
    set("adapter", One, |a, v| { a.adapter = Some(parse_usize(v)?); Ok(()) },
        "Adapter index as listed by `clip-wgpu info` (env CLIP_WGPU_ADAPTER)."),
    set("workers", One, |a, v| { a.workers = parse_usize(v)?; Ok(()) },
        "Image decoding threads. Default: one per CPU core."),
    set("shuffle_buffer", One, |a, v| { a.shuffle_buffer = parse_usize(v)?; Ok(()) },
        "WebDataset training shards: samples the shuffle buffer holds (memory stays this many samples \
         however many shards; 1 for no shuffling within shards). Default 1000."),
    set("demo_train_samples", One, |a, v| { a.demo_train_samples = parse_usize(v)?; Ok(()) },
        "Training examples of the built-in demo data. Default 512."),
    set("demo_eval_samples", One, |a, v| { a.demo_eval_samples = parse_usize(v)?; Ok(()) },
        "Evaluation examples of the built-in demo data. Default 128."),
    set("no_progress", Bool, |a, v| { a.no_progress = parse_bool(v)?; Ok(()) },
        "No progress bar (log lines only). Default false."),
    set("skip_nonfinite_steps", Bool, |a, v| { a.skip_nonfinite_steps = parse_bool(v)?; Ok(()) },
        "Skip an optimizer step whose loss or gradient is NaN or infinite (no update; counted and reported) \
         instead of stopping the run. Default false."),
    set("max_consecutive_nonfinite_steps", One, |a, v| { a.max_consecutive_nonfinite_steps = parse_usize(v)?; Ok(()) },
        "With --skip_nonfinite_steps: stop the run after this many skipped steps in a row (the latest \
         checkpoint is kept); 0 for no limit. Default 10."),
    set("sync_check_steps", One, |a, v| { a.sync_check_steps = parse_usize(v)?; Ok(()) },
        "Under mpirun: every N optimizer steps check that all ranks hold the same weights (a norm and \
         logit_scale per rank, compared bit for bit); 0 never. Default 0."),
    set("local_loss", Bool, |a, v| { a.local_loss = parse_bool(v)?; Ok(()) },
        "Under mpirun: each rank computes the contrastive loss of its own rows against every rank's \
         (OpenCLIP's --local-loss; the gradients reaching the gathered columns are summed over ranks, \
         so the step is the same) instead of the whole loss on every rank. Default false."),
];

fn spec(name: &str) -> Option<&'static Spec> {
    SPECS.iter().find(|s| s.name == name)
}

/// Levenshtein distance (for suggestions).
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, &cb) in b.iter().enumerate() {
            cur[j + 1] = (prev[j] + usize::from(ca != cb))
                .min(prev[j + 1] + 1)
                .min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

/// Up to three known flags close to `name`: names containing it, then by
/// edit distance.
fn suggestions(name: &str) -> Vec<&'static str> {
    let mut out: Vec<&'static str> = Vec::new();
    if name.len() >= 3 {
        for s in SPECS {
            if s.name.contains(name) && out.len() < 3 {
                out.push(s.name);
            }
        }
    }
    if out.is_empty() {
        let mut scored: Vec<(usize, &'static str)> = SPECS
            .iter()
            .map(|s| (edit_distance(name, s.name), s.name))
            .collect();
        scored.sort();
        let limit = (name.len() / 2).max(3);
        out.extend(
            scored
                .iter()
                .take(3)
                .filter(|(d, _)| *d <= limit)
                .map(|(_, n)| *n),
        );
        if let Some(best) = scored.first() {
            if out.is_empty() && best.0 <= name.len() {
                out.push(best.1);
            }
        }
    }
    out
}

/// Resolve a typed flag name (underscores already normalized) to a spec:
/// exact, `no_<bool>`, or an unambiguous prefix. Returns the spec, whether it
/// is negated, and a note when it was an abbreviation.
fn resolve(name: &str, typed: &str) -> Result<(&'static Spec, bool, Option<String>)> {
    if let Some(s) = spec(name) {
        return Ok((s, false, None));
    }
    if let Some(rest) = name.strip_prefix("no_") {
        if let Some(s) = spec(rest) {
            let target = match s.act {
                Act::Alias(t) => spec(t).expect("alias target"),
                _ => s,
            };
            if s.takes == Takes::Bool || target.takes == Takes::Bool || s.takes == Takes::Any {
                return Ok((s, true, None));
            }
        }
    }
    let matches: Vec<&'static Spec> = SPECS.iter().filter(|s| s.name.starts_with(name)).collect();
    if !name.is_empty() && !matches.is_empty() {
        let canon = |s: &'static Spec| match s.act {
            Act::Alias(t) => t,
            _ => s.name,
        };
        let first = canon(matches[0]);
        if matches.iter().all(|s| canon(s) == first) {
            let s = matches[0];
            return Ok((s, false, Some(format!("{typed} taken as --{}", s.name))));
        }
        let names: Vec<String> = matches
            .iter()
            .take(6)
            .map(|s| format!("--{}", s.name))
            .collect();
        bail!("{typed} is ambiguous: it could be {}", names.join(", "));
    }
    let sugg = suggestions(name);
    if sugg.is_empty() {
        bail!("unknown flag {typed} (see `clip-wgpu train --help`)");
    }
    let sugg: Vec<String> = sugg.iter().map(|s| format!("--{s}")).collect();
    bail!("unknown flag {typed}; did you mean {}?", sugg.join(" or "))
}

/// True when the arguments ask for help (`-h`, `--help`).
pub fn wants_help(argv: &[String]) -> bool {
    argv.iter().any(|a| a == "-h" || a == "--help")
}

/// The `clip-wgpu train --help` text: every flag that does something, with
/// its default.
pub fn usage() -> String {
    let mut s = String::from(
        "Usage: clip-wgpu train [--flag value | --flag=value]...   or   clip-wgpu train args.json\n\
         \n\
         The flags of transformers' examples/pytorch/contrastive-image-text/run_clip.py and its\n\
         TrainingArguments. Underscores and hyphens are interchangeable; booleans may be bare (--do_train)\n\
         or take a value (--do_train True). Other TrainingArguments flags (report_to, push_to_hub, tf32, ...)\n\
         are accepted with a note that they have no effect here. Without any data flag, a built-in demo\n\
         data set and model are used.\n\nFlags:\n",
    );
    for sp in SPECS {
        if let Act::Set(_) = sp.act {
            let arg = match sp.takes {
                Takes::Bool => String::new(),
                _ => " <value>".into(),
            };
            s.push_str(&format!("  --{}{}\n      {}\n", sp.name, arg, sp.help));
        }
    }
    s.push_str("\nAlso accepted: ");
    let aliases: Vec<String> = SPECS
        .iter()
        .filter_map(|sp| match sp.act {
            Act::Alias(t) => Some(format!("--{} (= --{t})", sp.name)),
            _ => None,
        })
        .collect();
    s.push_str(&aliases.join(", "));
    s.push('\n');
    s
}

/// Flags from a run_clip.py-style JSON file (`{"output_dir": "out", ...}`).
fn argv_from_json(path: &str) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {path}"))?;
    let v: Value =
        serde_json::from_str(&text).with_context(|| format!("parsing {path} as JSON"))?;
    let Value::Object(m) = v else {
        bail!("{path}: expected a JSON object of flag names and values");
    };
    let mut out = Vec::new();
    for (k, v) in m {
        match v {
            Value::Null => {}
            Value::Bool(b) => out.push(format!("--{k}={b}")),
            Value::Number(n) => out.push(format!("--{k}={n}")),
            Value::String(s) => out.push(format!("--{k}={s}")),
            Value::Array(items) => {
                out.push(format!("--{k}"));
                for it in items {
                    out.push(match it {
                        Value::String(s) => s,
                        other => other.to_string(),
                    });
                }
            }
            obj @ Value::Object(_) => out.push(format!("--{k}={obj}")),
        }
    }
    Ok(out)
}

/// Parse the arguments after `train`. Returns the settings and one-line
/// notes for the user (flags without effect here, abbreviations, repeated
/// flags, defaults that were filled in).
pub fn parse(argv: &[String]) -> Result<(TrainArgs, Vec<String>)> {
    let mut notes: Vec<String> = Vec::new();
    let argv: Vec<String> =
        if argv.len() == 1 && argv[0].ends_with(".json") && !argv[0].starts_with('-') {
            argv_from_json(&argv[0])?
        } else {
            argv.to_vec()
        };
    let mut a = TrainArgs::default();
    let mut given: Vec<&'static str> = Vec::new();
    let mut noted: Vec<&'static str> = Vec::new();
    let mut i = 0;
    while i < argv.len() {
        let tok = &argv[i];
        i += 1;
        let Some(body) = tok.strip_prefix("--").filter(|b| !b.is_empty()) else {
            if tok == "-h" {
                bail!("-h: use `clip-wgpu train --help` on its own");
            }
            bail!(
                "unexpected argument '{tok}': every setting is a --flag (a value that starts with '--' \
                 needs the --flag=value form)"
            );
        };
        let (raw_name, inline) = match body.split_once('=') {
            Some((n, v)) => (n, Some(v.to_string())),
            None => (body, None),
        };
        let typed = format!("--{raw_name}");
        let name = raw_name.replace('-', "_");
        let (sp, negated, abbrev) = resolve(&name, &typed)?;
        if let Some(n) = abbrev {
            notes.push(n);
        }
        // Gather the values this flag takes.
        let is_flag = |s: &String| s.starts_with("--") && s.len() > 2;
        let mut values: Vec<String> = Vec::new();
        if let Some(v) = inline {
            values.push(v);
        }
        match sp.takes {
            Takes::Bool => {
                if values.is_empty() && i < argv.len() && !is_flag(&argv[i]) {
                    values.push(argv[i].clone());
                    i += 1;
                }
            }
            Takes::One => {
                if values.is_empty() {
                    ensure!(
                        i < argv.len() && !is_flag(&argv[i]),
                        "{typed} needs a value"
                    );
                    values.push(argv[i].clone());
                    i += 1;
                }
            }
            Takes::Any => {
                while i < argv.len() && !is_flag(&argv[i]) {
                    values.push(argv[i].clone());
                    i += 1;
                }
            }
        }
        ensure!(!negated || values.is_empty(), "{typed} takes no value");
        let target = match sp.act {
            Act::Alias(t) => spec(t).expect("alias target"),
            _ => sp,
        };
        match target.act {
            Act::Note(why) => {
                if !noted.contains(&target.name) {
                    noted.push(target.name);
                    notes.push(format!("--{} has no effect here: {why}", target.name));
                }
            }
            Act::Set(f) => {
                let value = if negated {
                    "false".to_string()
                } else if target.takes == Takes::Bool && values.is_empty() {
                    "true".to_string()
                } else {
                    values[0].clone()
                };
                f(&mut a, &value).map_err(|e| anyhow!("{typed} {value}: {e}"))?;
                if given.contains(&target.name) {
                    notes.push(format!(
                        "--{} given more than once; the last value ({value}) wins",
                        target.name
                    ));
                } else {
                    given.push(target.name);
                }
            }
            Act::Alias(_) => unreachable!("aliases point at flags"),
        }
    }
    finish(&mut a, &given, &mut notes)?;
    Ok((a, notes))
}

/// Defaults of the built-in demo, for flags the user did not give.
#[allow(clippy::type_complexity)]
pub const DEMO_DEFAULTS: &[(&str, fn(&mut TrainArgs))] = &[
    ("learning_rate", |a| a.learning_rate = 1e-3),
    ("warmup_steps", |a| a.warmup_steps = 20.0),
    ("per_device_train_batch_size", |a| {
        a.per_device_train_batch_size = 16
    }),
    ("per_device_eval_batch_size", |a| {
        a.per_device_eval_batch_size = 32
    }),
    ("max_steps", |a| a.max_steps = 200),
    ("demo_train_samples", |a| a.demo_train_samples = 3200),
    ("demo_eval_samples", |a| a.demo_eval_samples = 120),
    ("logging_steps", |a| a.logging_steps = 20.0),
    ("save_steps", |a| a.save_steps = 100.0),
    ("overwrite_output_dir", |a| a.overwrite_output_dir = true),
    // Demo captions are a few words: a short text keeps the text tower cheap.
    ("max_seq_length", |a| a.max_seq_length = 16),
];

/// Checks and derived values, after all flags are read (TrainingArguments'
/// and run_clip.py's `__post_init__` rules, plus this crate's).
fn finish(a: &mut TrainArgs, given: &[&str], notes: &mut Vec<String>) -> Result<()> {
    let has = |n: &str| given.contains(&n);
    // The built-in demo trains a small model from scratch in a few minutes
    // on a CPU: it needs its own defaults (run_clip.py's are for fine-tuning).
    let demo = a.model_name_or_path.is_none()
        && a.config_name.is_none()
        && matches!(a.data_source(), Ok(DataSource::Demo));
    if demo {
        for (flag, set) in DEMO_DEFAULTS {
            if !has(flag) {
                set(a);
            }
        }
    }
    // Precision: one of the two half formats at most.
    ensure!(
        !(a.fp16 && a.bf16),
        "--fp16 and --bf16 both given: pick one precision (--fp16 for f16 with loss scaling, --bf16 \
         for bfloat16)"
    );
    a.precision = if a.fp16 {
        Precision::F16
    } else if a.bf16 {
        Precision::Bf16
    } else {
        Precision::F32
    };
    // Sizes.
    for (flag, v) in [
        ("per_device_train_batch_size", a.per_device_train_batch_size),
        ("per_device_eval_batch_size", a.per_device_eval_batch_size),
        ("gradient_accumulation_steps", a.gradient_accumulation_steps),
        ("max_seq_length", a.max_seq_length),
        ("demo_train_samples", a.demo_train_samples),
        ("demo_eval_samples", a.demo_eval_samples),
        ("workers", a.workers),
    ] {
        ensure!(v >= 1, "--{flag} must be at least 1, got {v}");
    }
    for (flag, v) in [
        ("max_train_samples", a.max_train_samples),
        ("max_eval_samples", a.max_eval_samples),
    ] {
        if let Some(v) = v {
            ensure!(v >= 1, "--{flag} must be at least 1, got {v}");
        }
    }
    // Optimizer (torch.optim.AdamW's own checks).
    ensure!(
        a.learning_rate >= 0.0,
        "--learning_rate must be >= 0, got {}",
        a.learning_rate
    );
    ensure!(
        a.weight_decay >= 0.0,
        "--weight_decay must be >= 0, got {}",
        a.weight_decay
    );
    for (flag, b) in [("adam_beta1", a.adam_beta1), ("adam_beta2", a.adam_beta2)] {
        ensure!(
            (0.0..1.0).contains(&b),
            "--{flag} must be in [0, 1), got {b}"
        );
    }
    ensure!(
        a.adam_epsilon >= 0.0,
        "--adam_epsilon must be >= 0, got {}",
        a.adam_epsilon
    );
    // Length of training.
    ensure!(
        a.num_train_epochs >= 0.0,
        "--num_train_epochs must be >= 0, got {}",
        a.num_train_epochs
    );
    if a.max_steps > 0 && has("num_train_epochs") {
        notes.push(format!(
            "--max_steps {} overrides --num_train_epochs {}",
            a.max_steps, a.num_train_epochs
        ));
    }
    // Warmup.
    ensure!(
        a.warmup_steps >= 0.0,
        "--warmup_steps must be >= 0, got {}",
        a.warmup_steps
    );
    ensure!(
        (0.0..=1.0).contains(&a.warmup_ratio),
        "--warmup_ratio must be in [0, 1], got {}",
        a.warmup_ratio
    );
    if a.warmup_steps > 0.0 && a.warmup_ratio > 0.0 {
        notes.push(format!(
            "both --warmup_steps {} and --warmup_ratio {} given; --warmup_steps wins, as in transformers",
            a.warmup_steps, a.warmup_ratio
        ));
    }
    // Scheduler name and kwargs.
    Schedule::with_kwargs(
        &a.lr_scheduler_type,
        a.learning_rate,
        0,
        100,
        &a.lr_scheduler_kwargs,
    )?;
    // Intervals (TrainingArguments.__post_init__).
    if a.eval_strategy != IntervalStrategy::No && !a.do_eval {
        a.do_eval = true;
    }
    if a.eval_strategy == IntervalStrategy::Steps && a.eval_steps.is_none_or(|e| e == 0.0) {
        ensure!(
            a.logging_steps > 0.0,
            "--eval_strategy steps needs a non-zero --eval_steps or --logging_steps"
        );
        a.eval_steps = Some(a.logging_steps);
    }
    let check_steps = |flag: &str, strategy: IntervalStrategy, v: Option<f64>| -> Result<()> {
        let Some(v) = v else { return Ok(()) };
        ensure!(v >= 0.0, "--{flag} must be >= 0, got {v}");
        if strategy == IntervalStrategy::Steps {
            ensure!(v > 0.0, "--{flag} must be > 0 with the steps strategy");
            ensure!(
                v < 1.0 || v.fract() == 0.0,
                "--{flag} must be an integer if bigger than 1: {v}"
            );
        }
        Ok(())
    };
    check_steps("logging_steps", a.logging_strategy, Some(a.logging_steps))?;
    check_steps("eval_steps", a.eval_strategy, a.eval_steps)?;
    check_steps("save_steps", a.save_strategy, Some(a.save_steps))?;
    // Data.
    let source = a.data_source()?;
    for (flag, f) in [
        ("train_file", &a.train_file),
        ("validation_file", &a.validation_file),
        ("test_file", &a.test_file),
    ] {
        if let Some(f) = f {
            let ext = f.extension().and_then(|e| e.to_str()).unwrap_or("");
            ensure!(
                matches!(ext.to_ascii_lowercase().as_str(), "csv" | "json" | "jsonl")
                    || (flag != "test_file" && crate::data::webdataset::is_shard_spec(f)),
                "--{flag} {}: should be a csv or a json (JSON lines) file, or WebDataset .tar shards \
                 (a brace pattern such as 'data/{{00000..00099}}.tar', a glob, or a .list file of shards)",
                f.display()
            );
        }
    }
    if let Some(name) = &a.dataset_name {
        if matches!(source, DataSource::Files { .. }) {
            notes.push(format!(
                "--dataset_name {name} cannot be fetched (no Hub access); reading the local \
                 --train_file/--validation_file instead"
            ));
        } else if a.train_file.is_some() || a.validation_file.is_some() {
            notes.push(
                "--train_file/--validation_file are ignored when --dataset_name is given, as in run_clip.py"
                    .into(),
            );
        }
    }
    if a.test_file.is_some() || a.do_predict {
        notes.push(
            "--do_predict/--test_file: run_clip.py only prepares the test split and never runs on it; \
             neither does this"
                .into(),
        );
    }
    if source == DataSource::Demo {
        if !a.do_train && !a.do_eval {
            a.do_train = true;
            a.do_eval = true;
            notes.push("no data given: training and evaluating on the built-in demo data".into());
        } else {
            notes.push("no data given: using the built-in demo data".into());
        }
    } else {
        ensure!(
            a.do_train || a.do_eval,
            "nothing to do: pass --do_train and/or --do_eval"
        );
    }
    if let DataSource::Files { train, validation } = &source {
        ensure!(
            !a.do_train || train.is_some(),
            "--do_train requires a train dataset: give --train_file"
        );
        ensure!(
            !a.do_eval || validation.is_some(),
            "--do_eval requires a validation dataset: give --validation_file"
        );
    }
    if a.do_train && a.max_steps == 0 {
        bail!("--max_steps 0 leaves nothing to train; use -1 (the default) to train by epochs");
    }
    if a.do_train && a.max_steps < 0 && a.num_train_epochs == 0.0 {
        bail!("--num_train_epochs 0 leaves nothing to train");
    }
    // Output.
    if !has("output_dir") {
        if source == DataSource::Demo {
            a.output_dir = PathBuf::from(DEMO_OUTPUT_DIR);
        }
        notes.push(format!(
            "no --output_dir given: writing to {}",
            a.output_dir.display()
        ));
    }
    Ok(())
}

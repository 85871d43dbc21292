//! What a run works with besides its arguments: the model (loaded, or
//! randomly initialised; the built-in demo's without model flags), its
//! tokenizer and image processor, and the training and evaluation examples.

use super::args::{DataSource, TrainArgs};
use super::checkpoint::ProcessingFiles;
use super::progress::log;
use crate::data::sources::{self, Dataset, Example, Split};
use crate::data::webdataset::{self, CaptionRule, ShardSet};
use crate::data::{demo, ImageProcessorConfig, TextTokenizer};
use crate::model::clip::ClipModel;
use crate::model::config::ModelConfig;
use crate::model::init::init_weights;
use crate::Gpu;
use anyhow::{ensure, Result};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Everything a run needs besides the arguments.
pub struct Setup {
    pub model: ClipModel,
    pub tokenizer: Arc<TextTokenizer>,
    pub processor: ImageProcessorConfig,
    pub processing: ProcessingFiles,
    pub train: Vec<Example>,
    /// WebDataset training shards (then `train` is empty): streamed.
    pub train_stream: Option<Arc<ShardSet>>,
    pub eval: Vec<Example>,
    pub max_len: usize,
    /// The built-in demo (no model and no data flags).
    pub demo: bool,
}

/// Files of the built-in demo model, embedded in the binary.
const DEMO_FILES: &[(&str, &[u8])] = &[
    (
        "config.json",
        include_bytes!("../../assets/demo/config.json"),
    ),
    (
        "processor_config.json",
        include_bytes!("../../assets/demo/processor_config.json"),
    ),
    (
        "tokenizer.json",
        include_bytes!("../../assets/clip-tokenizer/tokenizer.json"),
    ),
    (
        "tokenizer_config.json",
        include_bytes!("../../assets/clip-tokenizer/tokenizer_config.json"),
    ),
];

fn note_skips(d: &Dataset, what: &str) {
    if let Some(s) = d.skip_summary(what) {
        log(&s);
    }
}

fn truncate(mut v: Vec<Example>, max: Option<usize>) -> Vec<Example> {
    if let Some(m) = max {
        v.truncate(m);
    }
    v
}

/// Resolve the model, tokenizer, processor and data the arguments name.
pub fn setup(args: &TrainArgs, gpu: &Arc<Gpu>) -> Result<Setup> {
    args.check_paths()?;
    let source = args.data_source()?;
    let demo = matches!(source, DataSource::Demo)
        && args.model_name_or_path.is_none()
        && args.config_name.is_none();
    // Model, and the folder its tokenizer/processor files come from.
    let (model, files_dir) = if let Some(m) = &args.model_name_or_path {
        (ClipModel::load(gpu, m)?, m.clone())
    } else {
        let (config, dir) = if let Some(c) = &args.config_name {
            let file = if c.is_dir() {
                c.join("config.json")
            } else {
                c.clone()
            };
            let dir = file.parent().map(Path::to_path_buf).unwrap_or_default();
            (ModelConfig::from_file(&file)?, dir)
        } else {
            // The built-in demo model (assets/demo), or a random CLIP of
            // that shape when only data is given.
            let dir = std::env::temp_dir().join(format!("clip-wgpu-demo-{}", std::process::id()));
            std::fs::create_dir_all(&dir)?;
            for (name, bytes) in DEMO_FILES {
                std::fs::write(dir.join(name), bytes)?;
            }
            (ModelConfig::from_file(&dir.join("config.json"))?, dir)
        };
        let w = init_weights(&config, args.seed)?;
        (
            ClipModel::from_weights(gpu, config, &w, "random initialisation")?,
            dir,
        )
    };
    let tok_dir = args
        .tokenizer_name
        .clone()
        .unwrap_or_else(|| files_dir.clone());
    let tokenizer = Arc::new(TextTokenizer::from_model_dir(&tok_dir)?);
    let proc_dir = args
        .image_processor_name
        .clone()
        .unwrap_or_else(|| files_dir.clone());
    let processor = ImageProcessorConfig::from_model_dir(&proc_dir)?;
    let s = model.config.vision.image_size;
    ensure!(
        processor.crop_h == s && processor.crop_w == s,
        "the image processor in {} crops to {}x{} but the model takes {s}x{s} images",
        proc_dir.display(),
        processor.crop_h,
        processor.crop_w
    );
    let mut processing = ProcessingFiles::from_dir(&files_dir)?;
    if tok_dir != files_dir {
        processing
            .files
            .extend(ProcessingFiles::from_dir(&tok_dir)?.files);
    }
    let positions = model.config.text.max_positions();
    let mut max_len = args.max_seq_length;
    if max_len > positions {
        log(&format!(
            "--max_seq_length {max_len} is longer than the model's {positions} positions: using {positions}"
        ));
        max_len = positions;
    }
    // Data.
    let read_table = |f: &Option<PathBuf>, what: &str| -> Result<Vec<Example>> {
        match f {
            None => Ok(Vec::new()),
            Some(f) => {
                let d = if webdataset::is_shard_spec(f) {
                    // Evaluation shards: read in order, pictures opened
                    // in their shards when their batch comes.
                    let set = ShardSet::open(f, CaptionRule::for_column(&args.caption_column))?;
                    let d = webdataset::index(&set, args.max_eval_samples)?;
                    log(&format!(
                        "{what}: {} examples from {} shard(s)",
                        d.examples.len(),
                        set.shards.len()
                    ));
                    d
                } else if f.is_dir() {
                    sources::sidecar_folder(f)?
                } else {
                    sources::table(f, &args.image_column, &args.caption_column)?
                };
                note_skips(&d, what);
                Ok(d.examples)
            }
        }
    };
    let mut train_stream = None;
    let (train, eval) = match source {
        DataSource::Coco { data_dir, .. } => {
            let tr = if args.do_train {
                sources::coco(&data_dir, Split::Train)?
            } else {
                Dataset::default()
            };
            let ev = if args.do_eval {
                sources::coco(&data_dir, Split::Validation)?
            } else {
                Dataset::default()
            };
            note_skips(&tr, "COCO train");
            note_skips(&ev, "COCO validation");
            (tr.examples, ev.examples)
        }
        DataSource::Files { train, validation } => {
            let tr = match &train {
                Some(f) if webdataset::is_shard_spec(f) && args.do_train => {
                    let set = ShardSet::open(f, CaptionRule::for_column(&args.caption_column))?;
                    log(&format!(
                        "train file: {} WebDataset shard(s), streamed through a shuffle buffer of {}",
                        set.shards.len(),
                        args.shuffle_buffer.max(1)
                    ));
                    train_stream = Some(Arc::new(set));
                    Vec::new()
                }
                Some(f) if webdataset::is_shard_spec(f) => Vec::new(),
                _ => read_table(&train, "train file")?,
            };
            (tr, read_table(&validation, "validation file")?)
        }
        DataSource::Folder { dir } => {
            // A folder of pictures with captions: hold out 10% of the images.
            let d = sources::sidecar_folder(&dir)?;
            note_skips(&d, &dir.display().to_string());
            let (tr, ev) = sources::split_holdout(d.examples, 0.1, args.seed);
            log(&format!(
                "{}: {} training and {} held-out examples",
                dir.display(),
                tr.len(),
                ev.len()
            ));
            (tr, ev)
        }
        DataSource::Demo => (
            demo::examples(args.demo_train_samples, args.seed),
            demo::held_out(args.demo_eval_samples, args.seed),
        ),
    };
    Ok(Setup {
        model,
        tokenizer,
        processor,
        processing,
        train: truncate(train, args.max_train_samples),
        train_stream,
        eval: truncate(eval, args.max_eval_samples),
        max_len,
        demo,
    })
}

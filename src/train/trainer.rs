//! `clip-wgpu train`: run_clip.py's workflow. Load (or randomly initialise)
//! a model, read the data, train with AdamW and the chosen schedule, evaluate
//! (loss and retrieval recall@K), checkpoint, resume, and save a model that
//! transformers loads.

use crate::data::loader::{epoch_order, LoadedBatch, Loader, LoaderConfig};
use crate::data::sources::{self, Dataset, Example, Split};
use crate::data::{demo, ImageProcessorConfig, TextTokenizer};
use crate::model::clip::{Batch, ClipModel};
use crate::model::config::ModelConfig;
use crate::model::init::init_weights;
use crate::model::weights::write_atomic;
use crate::ops::adamw::AdamW;
use crate::ops::clamp::clamp_inplace;
use crate::tape::Tape;
use crate::tensor::Tensor;
use crate::train::args::{DataSource, Resume, TrainArgs};
use crate::train::checkpoint::{self, ProcessingFiles, RunState};
use crate::train::metrics::{loss_curve_png, recall_at_k, MetricsLog};
use crate::train::optimizer::Optimizer;
use crate::train::schedule::Schedule;
use crate::Gpu;
use anyhow::{bail, ensure, Context, Result};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

/// OpenCLIP's guard: logit_scale <= ln(100) (run_clip.py has none).
const MAX_LOGIT_SCALE: f32 = 4.605_170_2;

/// Everything a run needs besides the arguments.
pub struct Setup {
    pub model: ClipModel,
    pub tokenizer: Arc<TextTokenizer>,
    pub processor: ImageProcessorConfig,
    pub processing: ProcessingFiles,
    pub train: Vec<Example>,
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

fn log(msg: &str) {
    eprintln!("[clip-wgpu] {msg}");
}

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
                let d = if f.is_dir() {
                    sources::sidecar_folder(f)?
                } else {
                    sources::table(f, &args.image_column, &args.caption_column)?
                };
                note_skips(&d, what);
                Ok(d.examples)
            }
        }
    };
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
        DataSource::Files { train, validation } => (
            read_table(&train, "train file")?,
            read_table(&validation, "validation file")?,
        ),
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
        eval: truncate(eval, args.max_eval_samples),
        max_len,
        demo,
    })
}

fn to_batch(gpu: &Arc<Gpu>, b: &LoadedBatch, s: usize) -> Result<Batch> {
    Ok(Batch {
        pixels: Tensor::from_slice(gpu, &b.pixels, &[b.batch, 3, s, s])?,
        ids: b.ids.clone(),
        mask: b.mask.clone(),
        batch: b.batch,
    })
}

fn loader(
    setup: &Setup,
    examples: &Arc<Vec<Example>>,
    order: Vec<usize>,
    start: usize,
    batch: usize,
    args: &TrainArgs,
    drop_last: bool,
) -> Result<Loader> {
    Loader::new(
        examples.clone(),
        order,
        start,
        LoaderConfig {
            batch_size: batch,
            max_len: setup.max_len,
            workers: args.workers.max(1),
            prefetch: 4,
            drop_last,
        },
        setup.processor.clone(),
        setup.tokenizer.clone(),
    )
}

pub struct EvalResult {
    pub loss: f64,
    /// (name, value), e.g. ("i2t_recall@1", 0.42).
    pub recall: Vec<(String, f64)>,
    pub samples: usize,
    pub runtime_s: f64,
}

/// eval_loss (mean over examples of the per-batch contrastive loss, as the
/// Trainer averages it) and retrieval recall@1/5/10 in both directions, an
/// image counting once however many captions it has.
pub fn evaluate(setup: &Setup, examples: &[Example], args: &TrainArgs) -> Result<EvalResult> {
    let t0 = Instant::now();
    let gpu = setup.model.params.params[0].tensor.gpu().clone();
    let ex = Arc::new(examples.to_vec());
    let mut ld = loader(
        setup,
        &ex,
        (0..ex.len()).collect(),
        0,
        args.per_device_eval_batch_size,
        args,
        false,
    )?;
    let s = setup.model.config.vision.image_size;
    let (mut loss_sum, mut n) = (0.0f64, 0usize);
    let mut images: Vec<Vec<f32>> = Vec::new();
    let mut image_ids: Vec<u64> = Vec::new();
    let mut seen: HashMap<u64, ()> = HashMap::new();
    let mut texts: Vec<Vec<f32>> = Vec::new();
    let mut text_ids: Vec<u64> = Vec::new();
    while let Some(b) = ld.next_batch()? {
        for (p, why) in &b.skipped {
            log(&format!("skipped {}: {why}", p.display()));
        }
        let mut tape = Tape::no_grad();
        let vars = setup.model.params.vars(&mut tape);
        let out = setup
            .model
            .forward(&mut tape, &vars, &to_batch(&gpu, &b, s)?)?;
        loss_sum += out.loss.tensor().to_vec()?[0] as f64 * b.batch as f64;
        n += b.batch;
        let e = out.image_embeds.tensor().cols();
        let img = out.image_embeds.tensor().to_vec()?;
        let txt = out.text_embeds.tensor().to_vec()?;
        for i in 0..b.batch {
            texts.push(txt[i * e..(i + 1) * e].to_vec());
            text_ids.push(b.image_ids[i]);
            if seen.insert(b.image_ids[i], ()).is_none() {
                images.push(img[i * e..(i + 1) * e].to_vec());
                image_ids.push(b.image_ids[i]);
            }
        }
    }
    ensure!(n > 0, "the evaluation set has no usable examples");
    let r = recall_at_k(&images, &texts, &text_ids, &image_ids, &[1, 5, 10])?;
    let mut recall = Vec::new();
    for (k, v) in &r.i2t {
        recall.push((format!("i2t_recall@{k}"), *v));
    }
    for (k, v) in &r.t2i {
        recall.push((format!("t2i_recall@{k}"), *v));
    }
    Ok(EvalResult {
        loss: loss_sum / n as f64,
        recall,
        samples: n,
        runtime_s: t0.elapsed().as_secs_f64(),
    })
}

fn eval_json(r: &EvalResult, epoch: f64, prefix: &str) -> Value {
    let mut m = serde_json::Map::new();
    m.insert(format!("{prefix}loss"), json!(r.loss));
    for (k, v) in &r.recall {
        m.insert(format!("{prefix}{k}"), json!(v));
    }
    m.insert(format!("{prefix}runtime"), json!(r.runtime_s));
    m.insert(
        format!("{prefix}samples_per_second"),
        json!(r.samples as f64 / r.runtime_s.max(1e-9)),
    );
    m.insert("epoch".into(), json!(epoch));
    Value::Object(m)
}

fn print_eval(label: &str, r: &EvalResult) {
    let rec: Vec<String> = r
        .recall
        .iter()
        .map(|(k, v)| format!("{k} {:.3}", v))
        .collect();
    log(&format!(
        "{label}: eval_loss {:.4}, {} ({} examples)",
        r.loss,
        rec.join(", "),
        r.samples
    ));
}

/// run_clip.py's output_dir rule: refuse a non-empty folder without a
/// checkpoint unless --overwrite_output_dir; resume from the latest
/// checkpoint when there is one.
fn resolve_resume(args: &TrainArgs) -> Result<Option<PathBuf>> {
    let out = &args.output_dir;
    let explicit = match args.resume() {
        None => None,
        Some(Resume::Latest) => Some(checkpoint::latest_checkpoint(out).with_context(|| {
            format!(
                "--resume_from_checkpoint: no checkpoint found in {}",
                out.display()
            )
        })?),
        Some(Resume::Path(p)) => {
            ensure!(
                p.is_dir(),
                "--resume_from_checkpoint {}: no such checkpoint folder",
                p.display()
            );
            Some(p)
        }
    };
    if explicit.is_some() {
        return Ok(explicit);
    }
    if out.is_dir() && args.do_train && !args.overwrite_output_dir {
        let last = checkpoint::latest_checkpoint(out);
        let nonempty = std::fs::read_dir(out)
            .map(|mut d| d.next().is_some())
            .unwrap_or(false);
        if last.is_none() && nonempty {
            bail!(
                "Output directory ({}) already exists and is not empty. Use --overwrite_output_dir to overcome.",
                out.display()
            );
        }
        if let Some(l) = &last {
            log(&format!(
                "Checkpoint detected, resuming training at {}",
                l.display()
            ));
        }
        return Ok(last);
    }
    Ok(None)
}

/// Train (and/or evaluate) as the arguments say. Returns all_results.
pub fn run(args: &TrainArgs, gpu: &Arc<Gpu>) -> Result<Value> {
    let mut args = args.clone();
    let mut setup = setup(&args, gpu)?;
    if setup.demo && !args.do_train && !args.do_eval {
        args.do_train = true;
        args.do_eval = true;
    }
    ensure!(
        args.do_train || args.do_eval,
        "nothing to do: pass --do_train and/or --do_eval"
    );
    let resume = if args.do_train {
        resolve_resume(&args)?
    } else {
        None
    };
    if args.overwrite_output_dir && resume.is_none() && args.do_train && args.output_dir.is_dir() {
        std::fs::remove_dir_all(&args.output_dir)
            .with_context(|| format!("clearing {}", args.output_dir.display()))?;
    }
    std::fs::create_dir_all(&args.output_dir)
        .with_context(|| format!("creating {}", args.output_dir.display()))?;
    if args.freeze_vision_model || args.freeze_text_model {
        setup
            .model
            .freeze(args.freeze_vision_model, args.freeze_text_model);
    }
    let mut results = serde_json::Map::new();
    let mut before = None;
    if setup.demo && args.do_eval && !setup.eval.is_empty() {
        let r = evaluate(&setup, &setup.eval, &args)?;
        print_eval("before training", &r);
        before = Some(r);
    }
    let mut state = RunState::default();
    if args.do_train {
        ensure!(!setup.train.is_empty(), "the training set has no examples");
        state = train_loop(&args, &mut setup, resume.as_deref(), &mut results)?;
        checkpoint::save_model(&args.output_dir, &setup.model, &setup.processing)?;
        log(&format!("saved the model to {}", args.output_dir.display()));
    }
    if args.do_eval && !setup.eval.is_empty() {
        let r = evaluate(&setup, &setup.eval, &args)?;
        print_eval(
            if setup.demo {
                "after training"
            } else {
                "evaluation"
            },
            &r,
        );
        let ej = eval_json(&r, state.epoch, "eval_");
        write_json(&args.output_dir.join("eval_results.json"), &ej)?;
        if let Value::Object(m) = ej {
            results.extend(m);
        }
        if let Some(b) = before {
            let r1 = |r: &EvalResult| {
                r.recall
                    .iter()
                    .find(|(k, _)| k == "i2t_recall@1")
                    .map(|x| x.1)
                    .unwrap_or(0.0)
            };
            log(&format!(
                "demo: image-to-text recall@1 {:.3} before, {:.3} after training (chance {:.3})",
                r1(&b),
                r1(&r),
                1.0 / setup.eval.len() as f64
            ));
        }
    }
    let all = Value::Object(results);
    write_json(&args.output_dir.join("all_results.json"), &all)?;
    Ok(all)
}

fn write_json(p: &Path, v: &Value) -> Result<()> {
    write_atomic(p, serde_json::to_string_pretty(v)?.as_bytes())
}

fn train_loop(
    args: &TrainArgs,
    setup: &mut Setup,
    resume: Option<&Path>,
    results: &mut serde_json::Map<String, Value>,
) -> Result<RunState> {
    let gpu = setup.model.params.params[0].tensor.gpu().clone();
    let t0 = Instant::now();
    let examples = Arc::new(setup.train.clone());
    let bs = args.per_device_train_batch_size;
    let batches_per_epoch = args.batches_per_epoch(examples.len());
    let total = args.total_steps(batches_per_epoch);
    ensure!(
        total > 0,
        "no training steps: check --max_steps / --num_train_epochs and the data size"
    );
    let log_every = args.logging_steps_for(total);
    let eval_every = args.eval_steps_for(total);
    let save_every = args.save_steps_for(total);
    let accum = args.gradient_accumulation_steps.max(1);
    let warmup = args.warmup_steps_for(total);
    let schedule = Schedule::new(
        &args.lr_scheduler_type,
        args.learning_rate,
        warmup as u64,
        total as u64,
    )?;
    let hp = AdamW {
        lr: args.learning_rate as f32,
        beta1: args.adam_beta1 as f32,
        beta2: args.adam_beta2 as f32,
        eps: args.adam_epsilon as f32,
        weight_decay: args.weight_decay as f32,
    };
    let mut opt = Optimizer::new(&setup.model.params, hp, args.max_grad_norm as f32)?;
    let mut state = RunState::default();
    if let Some(dir) = resume {
        let loaded = checkpoint::load_checkpoint(dir)?;
        let m = ClipModel::load(&gpu, dir)?;
        for (dst, src) in setup.model.params.params.iter().zip(&m.params.params) {
            ensure!(
                dst.name == src.name,
                "checkpoint {} holds a different model",
                dir.display()
            );
            dst.tensor.write(&src.tensor.to_vec()?)?;
        }
        opt.load_state(
            &setup.model.params,
            &loaded.optimizer,
            &dir.display().to_string(),
        )?;
        state = loaded.state;
        log(&format!(
            "resumed from {} at step {}",
            dir.display(),
            state.global_step
        ));
    }
    let run_info = json!({
        "seed": args.seed,
        "train_examples": examples.len(),
        "batch_size": bs,
        "gradient_accumulation_steps": accum,
        "max_steps": total,
    });
    log(&format!(
        "training: {} examples, batch {bs}, {accum} accumulation step(s), {total} optimizer steps, warmup {warmup}, \
         {} schedule, lr {}",
        examples.len(),
        args.lr_scheduler_type,
        args.learning_rate
    ));
    let mut metrics = MetricsLog::open(&args.output_dir.join("metrics.jsonl"))?;
    let s = setup.model.config.vision.image_size;
    let ls_index = setup.model.logit_scale;
    let mut window = (0.0f64, 0usize);
    let mut last_log = Instant::now();
    let mut images_since = 0usize;
    let mut train_losses: Vec<(f64, f64)> = state
        .log_history
        .iter()
        .filter_map(|e| Some((e.get("step")?.as_f64()?, e.get("loss")?.as_f64()?)))
        .collect();
    let mut eval_losses: Vec<(f64, f64)> = state
        .log_history
        .iter()
        .filter_map(|e| Some((e.get("step")?.as_f64()?, e.get("eval_loss")?.as_f64()?)))
        .collect();
    let mut skipped_total = 0usize;
    let progress =
        crate::train::progress::Progress::new(total as u64, state.global_step, !args.no_progress);
    let mut total_loss = 0.0f64;
    let mut loss_steps = 0usize;
    'epochs: while (state.global_step as usize) < total {
        let epoch = state.data_epoch;
        let order = epoch_order(examples.len(), args.data_seed(), epoch);
        let mut ld = loader(
            setup,
            &examples,
            order,
            state.data_position,
            bs,
            args,
            args.dataloader_drop_last,
        )?;
        let mut acc: Option<Vec<Option<Tensor>>> = None;
        let mut micro = 0usize;
        let mut step_loss = 0.0f64;
        loop {
            let b = ld.next_batch()?;
            let end_of_epoch = b.is_none();
            if let Some(b) = &b {
                for (p, why) in &b.skipped {
                    skipped_total += 1;
                    if skipped_total <= 5 {
                        log(&format!("skipped {}: {why}", p.display()));
                    }
                }
                let mut tape = Tape::new();
                let vars = setup.model.params.vars(&mut tape);
                let out = setup
                    .model
                    .forward(&mut tape, &vars, &to_batch(&gpu, b, s)?)?;
                // The Trainer divides the loss by the accumulation steps.
                let seed = Tensor::scalar(&gpu, 1.0 / accum as f32)?;
                let mut g = tape.backward_with(&out.loss, seed)?;
                let grads = setup.model.params.grads(&vars, &mut g);
                let l = out.loss.tensor().to_vec()?[0] as f64;
                if !l.is_finite() {
                    bail!(
                        "the loss became {l} at step {}: lower --learning_rate",
                        state.global_step + 1
                    );
                }
                step_loss += l / accum as f64;
                images_since += b.batch;
                acc = Some(match acc.take() {
                    None => grads,
                    Some(mut a) => {
                        for (x, y) in a.iter_mut().zip(grads) {
                            match (x.as_ref(), y) {
                                (Some(x), Some(y)) => crate::ops::elementwise::add_assign(x, &y)?,
                                (None, Some(y)) => *x = Some(y),
                                _ => {}
                            }
                        }
                        a
                    }
                });
                micro += 1;
            }
            // Step when the accumulation is full, or on the last partial
            // group of an epoch (as the Trainer does).
            if micro > 0 && (micro == accum || end_of_epoch) {
                let lr = schedule.lr_at(state.global_step) as f32;
                let grads = acc.take().unwrap();
                let norm = opt.update(&setup.model.params, &grads, lr)?;
                drop(grads);
                clamp_inplace(
                    &setup.model.params.params[ls_index].tensor,
                    f32::MIN,
                    MAX_LOGIT_SCALE,
                )?;
                state.global_step += 1;
                state.data_position = ld.position();
                state.epoch = epoch as f64 + state.data_position as f64 / examples.len() as f64;
                total_loss += step_loss;
                loss_steps += 1;
                window.0 += step_loss;
                window.1 += 1;
                progress.step(state.global_step, step_loss, lr as f64);
                micro = 0;
                step_loss = 0.0;
                let step = state.global_step as usize;
                if log_every > 0 && (step % log_every == 0 || step == total) {
                    let nv = norm.to_vec()?;
                    let dt = last_log.elapsed().as_secs_f64();
                    let entry = json!({
                        "loss": window.0 / window.1 as f64,
                        "grad_norm": nv[0],
                        "learning_rate": lr,
                        "epoch": state.epoch,
                        "step": step,
                        "images_per_second": images_since as f64 / dt.max(1e-9),
                    });
                    train_losses.push((step as f64, window.0 / window.1 as f64));
                    progress.log(&format!(
                        "step {step}/{total}: loss {:.4}, lr {:.3e}, grad_norm {:.3}, {:.1} images/s",
                        window.0 / window.1 as f64,
                        lr,
                        nv[0],
                        images_since as f64 / dt.max(1e-9)
                    ));
                    metrics.write(&entry)?;
                    state.log_history.push(entry);
                    window = (0.0, 0);
                    images_since = 0;
                    last_log = Instant::now();
                }
                if args.do_eval
                    && args.evaluates_during_training()
                    && eval_every > 0
                    && step % eval_every == 0
                    && !setup.eval.is_empty()
                {
                    let r = evaluate(setup, &setup.eval, args)?;
                    let mut entry = eval_json(&r, state.epoch, "eval_");
                    entry["step"] = json!(step);
                    eval_losses.push((step as f64, r.loss));
                    metrics.write(&entry)?;
                    progress.log(&format!("step {step}: eval_loss {:.4}", r.loss));
                    state.log_history.push(entry);
                }
                if save_every > 0 && step % save_every == 0 && step < total {
                    let scheduler = schedule.to_json(state.global_step);
                    let p = checkpoint::save_checkpoint(
                        &args.output_dir,
                        &setup.model,
                        &opt,
                        &state,
                        &scheduler,
                        &run_info,
                        &setup.processing,
                    )?;
                    progress.log(&format!("saved {}", p.display()));
                    if let Some(limit) = args.save_total_limit {
                        checkpoint::rotate(&args.output_dir, limit)?;
                    }
                }
                if step >= total {
                    break 'epochs;
                }
            }
            if end_of_epoch {
                break;
            }
        }
        state.data_epoch += 1;
        state.data_position = 0;
    }
    progress.finish();
    gpu.sync()?;
    // The final state as a checkpoint too, so a finished run can be extended.
    let scheduler = schedule.to_json(state.global_step);
    checkpoint::save_checkpoint(
        &args.output_dir,
        &setup.model,
        &opt,
        &state,
        &scheduler,
        &run_info,
        &setup.processing,
    )?;
    if let Some(limit) = args.save_total_limit {
        checkpoint::rotate(&args.output_dir, limit)?;
    }
    let runtime = t0.elapsed().as_secs_f64();
    let train = json!({
        "epoch": state.epoch,
        "train_loss": total_loss / loss_steps.max(1) as f64,
        "train_runtime": runtime,
        "train_samples_per_second": (loss_steps * bs * accum) as f64 / runtime.max(1e-9),
        "train_steps_per_second": loss_steps as f64 / runtime.max(1e-9),
        "train_skipped_images": skipped_total,
    });
    write_json(&args.output_dir.join("train_results.json"), &train)?;
    write_json(
        &args.output_dir.join("trainer_state.json"),
        &state.to_json(&run_info),
    )?;
    if let Value::Object(m) = train {
        results.extend(m);
    }
    loss_curve_png(
        &args.output_dir.join("loss_curve.png"),
        &train_losses,
        &eval_losses,
    )?;
    if skipped_total > 0 {
        log(&format!(
            "skipped {skipped_total} unreadable image(s) in total"
        ));
    }
    Ok(state)
}

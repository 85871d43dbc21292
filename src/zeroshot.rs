//! `clip-wgpu zero-shot`: classify the pictures of an ImageFolder (one
//! sub-folder per class) by comparing them with text prompts, the way
//! CLIP_benchmark (`clip_benchmark/metrics/zeroshot_classification.py`) and
//! OpenCLIP (`open_clip/zero_shot_classifier.py`) do:
//!
//! - each class's embedding is the mean of its prompts' L2-normalised text
//!   embeddings (one prompt per template, `{c}` replaced by the class name),
//!   normalised again;
//! - logits = 100 x (L2-normalised image embedding) . (class embedding), the
//!   fixed scale both use (not the model's `logit_scale`; the ranking is the
//!   same either way);
//! - top-1 and top-5 accuracy (top-5 only with 5 classes or more:
//!   CLIP_benchmark reports NaN below that) and the mean per-class recall
//!   (sklearn's `balanced_accuracy_score`: the mean over the classes that
//!   have pictures of the fraction of them predicted right).
//!
//! Classes and files follow torchvision's `ImageFolder`: the sub-folders in
//! sorted order are the classes (their index is their place in that order),
//! each searched recursively, its folders visited in sorted order of their
//! paths and their files in sorted order of names. A class's name is its
//! folder name with `_` as spaces (as CLIP_benchmark names the classes of
//! folder datasets) unless a classes file names it.

use crate::data::loader::{Loader, LoaderConfig};
use crate::data::sources::{Example, ImageSource, IMAGE_EXTENSIONS};
use crate::data::{ImageProcessorConfig, TextTokenizer};
use crate::model::clip::ClipModel;
use crate::ops::l2norm::l2_normalize;
use crate::ops::matmul::{gemm, Gemm};
use crate::tape::Tape;
use crate::tensor::Tensor;
use crate::Gpu;
use anyhow::{bail, ensure, Context, Result};
use serde_json::{json, Value};
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

/// OpenAI's 80 ImageNet prompt templates (OpenCLIP's
/// `OPENAI_IMAGENET_TEMPLATES`), one a line, `{c}` for the class name.
pub const OPENAI_IMAGENET_TEMPLATES: &str = include_str!("../assets/templates/openai_imagenet.txt");
/// The 7-template subset (OpenCLIP's `SIMPLE_IMAGENET_TEMPLATES`, from
/// OpenAI's prompt-engineering notebook).
pub const SIMPLE_IMAGENET_TEMPLATES: &str = include_str!("../assets/templates/simple_imagenet.txt");

/// The fixed logit scale of CLIP_benchmark and OpenCLIP's zero-shot code.
pub const LOGIT_SCALE: f32 = 100.0;

/// Prompt templates and where they came from.
#[derive(Clone, Debug, PartialEq)]
pub struct Templates {
    /// `openai`, `simple`, or the file's path.
    pub source: String,
    pub templates: Vec<String>,
}

impl Templates {
    /// `openai` (80 templates), `simple` (7), or a file: one template a
    /// line, `{c}` where the class name goes; blank lines and lines starting
    /// with `#` are skipped, each line is trimmed.
    pub fn from_spec(spec: &str) -> Result<Templates> {
        let (source, text) = match spec {
            "openai" => (spec.to_string(), OPENAI_IMAGENET_TEMPLATES.to_string()),
            "simple" => (spec.to_string(), SIMPLE_IMAGENET_TEMPLATES.to_string()),
            path => {
                let text = std::fs::read_to_string(path).with_context(|| {
                    format!(
                        "--templates {path:?}: not `openai` or `simple`, and reading it as a \
                         file failed"
                    )
                })?;
                (path.to_string(), text)
            }
        };
        let templates = parse_templates(&text, &source)?;
        Ok(Templates { source, templates })
    }

    /// The prompt of `template` for a class.
    pub fn prompt(template: &str, class: &str) -> String {
        template.replace("{c}", class)
    }
}

/// Templates from a templates file's text (see [`Templates::from_spec`]).
pub fn parse_templates(text: &str, source: &str) -> Result<Vec<String>> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let t = line.trim();
        if t.is_empty() || t.starts_with('#') {
            continue;
        }
        ensure!(
            t.contains("{c}"),
            "{source}, line {}: the template {t:?} has no {{c}} for the class name",
            i + 1
        );
        out.push(t.to_string());
    }
    ensure!(!out.is_empty(), "{source}: no templates in it");
    Ok(out)
}

/// The default name of a class folder: `_` as spaces.
pub fn default_class_name(folder: &str) -> String {
    folder.replace('_', " ")
}

/// A classes file: folder -> class name. Either a JSON object
/// (`{"n01440764": "tench", ...}`) or lines `folder<TAB>class name` (blank
/// lines and lines starting with `#` skipped). Folders it does not list keep
/// their default name; every folder it lists must exist.
pub fn read_classes_file(path: &Path) -> Result<Vec<(String, String)>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading the classes file {}", path.display()))?;
    parse_classes(&text, &path.display().to_string())
}

/// [`read_classes_file`] on the file's text; `source` names it in errors.
pub fn parse_classes(text: &str, source: &str) -> Result<Vec<(String, String)>> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let mut out: Vec<(String, String)> = Vec::new();
    if text.trim_start().starts_with('{') {
        let v: Value = serde_json::from_str(text)
            .with_context(|| format!("{source}: parsing it as JSON (an object folder -> name)"))?;
        let Value::Object(m) = v else {
            bail!("{source}: expected a JSON object folder -> name");
        };
        for (k, v) in m {
            let Some(name) = v.as_str() else {
                bail!("{source}: the name of folder {k:?} must be a string, got {v}");
            };
            out.push((k, name.trim().to_string()));
        }
    } else {
        for (i, line) in text.lines().enumerate() {
            let l = line.trim_end_matches(['\r', '\n']);
            if l.trim().is_empty() || l.trim_start().starts_with('#') {
                continue;
            }
            let Some((folder, name)) = l.split_once('\t') else {
                bail!(
                    "{source}, line {}: expected `folder<TAB>class name`, got {l:?}",
                    i + 1
                );
            };
            out.push((folder.trim().to_string(), name.trim().to_string()));
        }
    }
    let mut seen = HashSet::new();
    for (folder, name) in &out {
        ensure!(
            seen.insert(folder.as_str()),
            "{source}: folder {folder:?} is listed twice"
        );
        ensure!(
            !name.is_empty(),
            "{source}: folder {folder:?} has an empty name"
        );
    }
    Ok(out)
}

/// One class of an [`ImageFolder`].
#[derive(Clone, Debug, PartialEq)]
pub struct Class {
    pub folder: String,
    pub name: String,
}

/// torchvision's `ImageFolder` layout: classes and (picture, class index).
#[derive(Clone, Debug, PartialEq)]
pub struct ImageFolder {
    pub root: PathBuf,
    pub classes: Vec<Class>,
    pub samples: Vec<(PathBuf, usize)>,
}

fn is_picture(p: &Path) -> bool {
    p.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| IMAGE_EXTENSIONS.iter().any(|x| e.eq_ignore_ascii_case(x)))
}

/// Every folder under `dir` (itself included), following symbolic links to
/// folders but never into a folder twice (no cycles).
fn folders_under(dir: &Path, seen: &mut HashSet<PathBuf>, out: &mut Vec<PathBuf>) -> Result<()> {
    let real = std::fs::canonicalize(dir).with_context(|| format!("reading {}", dir.display()))?;
    if !seen.insert(real) {
        return Ok(());
    }
    out.push(dir.to_path_buf());
    let mut subs = Vec::new();
    for e in std::fs::read_dir(dir).with_context(|| format!("reading folder {}", dir.display()))? {
        let p = e
            .with_context(|| format!("reading folder {}", dir.display()))?
            .path();
        if p.is_dir() {
            subs.push(p);
        }
    }
    for p in subs {
        folders_under(&p, seen, out)?;
    }
    Ok(())
}

/// The pictures of one class folder in torchvision's order: its folders
/// sorted by path, each one's files sorted by name.
fn class_pictures(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut dirs = Vec::new();
    folders_under(dir, &mut HashSet::new(), &mut dirs)?;
    dirs.sort_by(|a, b| {
        a.as_os_str()
            .as_encoded_bytes()
            .cmp(b.as_os_str().as_encoded_bytes())
    });
    let mut out = Vec::new();
    for d in dirs {
        let mut files = Vec::new();
        for e in std::fs::read_dir(&d).with_context(|| format!("reading folder {}", d.display()))? {
            let p = e
                .with_context(|| format!("reading folder {}", d.display()))?
                .path();
            if p.is_file() && is_picture(&p) {
                files.push(p);
            }
        }
        files.sort_by(|a, b| a.file_name().cmp(&b.file_name()));
        out.extend(files);
    }
    Ok(out)
}

impl ImageFolder {
    /// Read `root`: its sub-folders (sorted by name; hidden ones, starting
    /// with `.`, left out) are the classes, named by `names` (folder ->
    /// name) or by default. Pictures are the files whose extension the
    /// image reader takes (png, jpg, jpeg, webp, gif, bmp, any case).
    pub fn read(root: &Path, names: &[(String, String)]) -> Result<ImageFolder> {
        ensure!(root.is_dir(), "--data {}: not a folder", root.display());
        let mut folders = Vec::new();
        for e in
            std::fs::read_dir(root).with_context(|| format!("reading folder {}", root.display()))?
        {
            let e = e.with_context(|| format!("reading folder {}", root.display()))?;
            let name = e.file_name();
            if e.path().is_dir() && !name.as_encoded_bytes().starts_with(b".") {
                let Some(s) = name.to_str() else {
                    bail!(
                        "{}: the folder name {name:?} is not valid UTF-8 (class names are text)",
                        root.display()
                    );
                };
                folders.push(s.to_string());
            }
        }
        folders.sort();
        ensure!(
            folders.len() >= 2,
            "--data {}: zero-shot classification needs one sub-folder per class and at least \
             two classes; found {}",
            root.display(),
            folders.len()
        );
        let rename: HashMap<&str, &str> = names
            .iter()
            .map(|(f, n)| (f.as_str(), n.as_str()))
            .collect();
        for (f, _) in names {
            ensure!(
                folders.iter().any(|x| x == f),
                "the classes file names folder {f:?}, which {} does not have (its class folders: {})",
                root.display(),
                folders.join(", ")
            );
        }
        let classes: Vec<Class> = folders
            .iter()
            .map(|f| Class {
                folder: f.clone(),
                name: rename
                    .get(f.as_str())
                    .map_or_else(|| default_class_name(f), |n| n.to_string()),
            })
            .collect();
        let mut samples = Vec::new();
        for (i, c) in classes.iter().enumerate() {
            for p in class_pictures(&root.join(&c.folder))? {
                samples.push((p, i));
            }
        }
        ensure!(
            !samples.is_empty(),
            "--data {}: no pictures ({}) in its class folders",
            root.display(),
            IMAGE_EXTENSIONS.join(", ")
        );
        Ok(ImageFolder {
            root: root.to_path_buf(),
            classes,
            samples,
        })
    }
}

/// Each class's zero-shot weights: the mean of its prompts' L2-normalised
/// text embeddings, normalised again (the mean is taken in f64). Prompts
/// run through the text tower `batch` at a time, padded to the model's
/// maximum length as transformers' `padding="max_length"` does.
pub fn class_embeddings(
    model: &ClipModel,
    tokenizer: &TextTokenizer,
    names: &[String],
    templates: &[String],
    batch: usize,
) -> Result<Vec<Vec<f32>>> {
    ensure!(batch > 0, "the batch size must be at least 1");
    let prompts: Vec<String> = names
        .iter()
        .flat_map(|c| templates.iter().map(move |t| Templates::prompt(t, c)))
        .collect();
    let len = model.config.text.max_positions();
    let e = model.config.projection_dim;
    let mut sums = vec![vec![0f64; e]; names.len()];
    for (chunk_no, chunk) in prompts.chunks(batch).enumerate() {
        let refs: Vec<&str> = chunk.iter().map(String::as_str).collect();
        let (ids, mask) = tokenizer.encode_batch(&refs, len)?;
        let mut tape = Tape::no_grad();
        let vars = model.params.vars(&mut tape);
        let f = model.text_features(&mut tape, &vars, &ids, &mask, chunk.len())?;
        let v = l2_normalize(&mut tape, &f)?.tensor().to_vec()?;
        for (j, row) in v.chunks(e).enumerate() {
            let class = (chunk_no * batch + j) / templates.len();
            for (s, x) in sums[class].iter_mut().zip(row) {
                *s += *x as f64;
            }
        }
    }
    sums.iter()
        .zip(names)
        .map(|(s, name)| {
            let norm = s.iter().map(|x| x * x).sum::<f64>().sqrt();
            ensure!(
                norm.is_finite() && norm > 0.0,
                "class {name:?}: its prompts' embeddings sum to {} (norm {norm})",
                if norm.is_finite() {
                    "zero"
                } else {
                    "a non-finite vector"
                }
            );
            Ok(s.iter().map(|x| (x / norm) as f32).collect())
        })
        .collect()
}

/// What `zero-shot` is asked to do.
#[derive(Clone, Debug)]
pub struct Options {
    pub model: PathBuf,
    pub data: PathBuf,
    pub classes: Option<PathBuf>,
    /// `openai`, `simple` or a file.
    pub templates: String,
    /// Pictures (and prompts) per forward pass.
    pub batch_size: usize,
    /// Picture decoding threads.
    pub workers: usize,
    /// A progress bar on stderr (when it is a terminal).
    pub progress: bool,
}

/// Everything a zero-shot run found.
#[derive(Clone, Debug)]
pub struct ZeroShot {
    pub classes: Vec<Class>,
    pub templates: Templates,
    /// The classes' weights, [classes][projection_dim].
    pub class_embeddings: Vec<Vec<f32>>,
    /// The pictures classified, relative to the data folder.
    pub files: Vec<PathBuf>,
    pub labels: Vec<usize>,
    /// [pictures][classes], 100 x image . class.
    pub logits: Vec<Vec<f32>>,
    /// Pictures that could not be read or decoded: (path, reason).
    pub skipped: Vec<(PathBuf, String)>,
    pub text_seconds: f64,
    pub image_seconds: f64,
    pub total_seconds: f64,
}

/// Run zero-shot classification of `opts.data` with the model in `opts.model`.
pub fn run(gpu: &Arc<Gpu>, opts: &Options) -> Result<ZeroShot> {
    let t0 = Instant::now();
    ensure!(opts.batch_size > 0, "--batch_size must be at least 1");
    let templates = Templates::from_spec(&opts.templates)?;
    let names = match &opts.classes {
        Some(p) => read_classes_file(p)?,
        None => Vec::new(),
    };
    let folder = ImageFolder::read(&opts.data, &names)?;
    let model = ClipModel::load(gpu, &opts.model)?;
    let tokenizer = Arc::new(TextTokenizer::from_model_dir(&opts.model)?);
    let processor = ImageProcessorConfig::from_model_dir(&opts.model)?;
    let s = model.config.vision.image_size;
    ensure!(
        processor.output_hw(s, s) == (s, s) && processor.output_hw(1, 1) == (s, s),
        "{}: the image processor does not make {s}x{s} pictures (the model's image_size); \
         it must center-crop to {s}x{s} or resize to it",
        opts.model.display()
    );

    let t_text = Instant::now();
    let class_names: Vec<String> = folder.classes.iter().map(|c| c.name.clone()).collect();
    let weights = class_embeddings(
        &model,
        &tokenizer,
        &class_names,
        &templates.templates,
        opts.batch_size,
    )?;
    let text_seconds = t_text.elapsed().as_secs_f64();

    let t_img = Instant::now();
    let n_classes = weights.len();
    let e = model.config.projection_dim;
    let flat: Vec<f32> = weights.concat();
    let class_t = Tensor::from_slice(gpu, &flat, &[n_classes, e])?;
    let examples: Arc<Vec<Example>> = Arc::new(
        folder
            .samples
            .iter()
            .enumerate()
            .map(|(i, (p, _))| Example {
                image: ImageSource::File(p.clone()),
                caption: String::new(),
                image_id: i as u64,
            })
            .collect(),
    );
    let mut loader = Loader::new(
        examples.clone(),
        (0..examples.len()).collect(),
        0,
        LoaderConfig {
            batch_size: opts.batch_size,
            // The loader tokenizes each example's caption (empty here).
            max_len: model.config.text.max_positions(),
            workers: opts.workers.max(1),
            prefetch: 2,
            drop_last: false,
            refill: true,
        },
        processor,
        tokenizer,
    )?;
    let bar = progress_bar(opts.progress, examples.len() as u64);
    let mut files = Vec::new();
    let mut labels = Vec::new();
    let mut logits = Vec::new();
    while let Some(b) = loader.next_batch()? {
        let mut tape = Tape::no_grad();
        let vars = model.params.vars(&mut tape);
        let px = Tensor::from_slice(gpu, &b.pixels, &[b.batch, 3, s, s])?;
        let f = model.image_features(&mut tape, &vars, &px)?;
        let img = l2_normalize(&mut tape, &f)?;
        let l = gemm(
            img.tensor(),
            &class_t,
            None,
            Gemm::new(1, b.batch, n_classes, e)
                .tb(true)
                .alpha(LOGIT_SCALE),
        )?
        .to_vec()?;
        for (row, &pos) in l.chunks(n_classes).zip(&b.positions) {
            ensure!(
                row.iter().all(|x| x.is_finite()),
                "{}: non-finite logits {row:?}",
                folder.samples[pos].0.display()
            );
            let (path, label) = &folder.samples[pos];
            files.push(
                path.strip_prefix(&folder.root)
                    .unwrap_or(path)
                    .to_path_buf(),
            );
            labels.push(*label);
            logits.push(row.to_vec());
        }
        if let Some(bar) = &bar {
            bar.set_position((b.positions.last().map_or(0, |p| p + 1)) as u64);
        }
    }
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    ensure!(
        !files.is_empty(),
        "none of the {} pictures under {} could be read",
        examples.len(),
        opts.data.display()
    );
    Ok(ZeroShot {
        classes: folder.classes,
        templates,
        class_embeddings: weights,
        files,
        labels,
        logits,
        skipped: loader.skipped().to_vec(),
        text_seconds,
        image_seconds: t_img.elapsed().as_secs_f64(),
        total_seconds: t0.elapsed().as_secs_f64(),
    })
}

fn progress_bar(enabled: bool, total: u64) -> Option<indicatif::ProgressBar> {
    use std::io::IsTerminal;
    if !enabled || !std::io::stderr().is_terminal() {
        return None;
    }
    let bar = indicatif::ProgressBar::with_draw_target(
        Some(total),
        indicatif::ProgressDrawTarget::stderr(),
    );
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{bar:30} {pos}/{len} pictures  {per_sec}  ETA {eta}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    Some(bar)
}

/// The classes of one picture's logits from best to worst (ties: the lower
/// index first, as a stable sort gives them).
pub fn ranking(logits: &[f32]) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..logits.len()).collect();
    idx.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
    idx
}

/// Per-class figures.
#[derive(Clone, Debug, PartialEq)]
pub struct ClassStats {
    /// Pictures of this class.
    pub images: usize,
    /// Of them, predicted right (top-1).
    pub correct: usize,
    /// Of them, with their class among the 5 best.
    pub top5: usize,
    /// How often each other class was predicted for them: (class, count),
    /// most frequent first.
    pub confusions: Vec<(usize, usize)>,
}

impl ClassStats {
    pub fn recall(&self) -> Option<f64> {
        (self.images > 0).then(|| self.correct as f64 / self.images as f64)
    }
}

/// The figures CLIP_benchmark reports, and per-class ones.
#[derive(Clone, Debug, PartialEq)]
pub struct Metrics {
    pub top1: f64,
    /// None with fewer than 5 classes (CLIP_benchmark: NaN).
    pub top5: Option<f64>,
    /// The mean over classes with pictures of their top-1 recall.
    pub mean_per_class_recall: f64,
    pub predictions: Vec<usize>,
    pub per_class: Vec<ClassStats>,
}

/// Accuracy figures of `logits` ([pictures][classes]) against `labels`.
pub fn metrics(logits: &[Vec<f32>], labels: &[usize], n_classes: usize) -> Metrics {
    let mut per_class = vec![
        ClassStats {
            images: 0,
            correct: 0,
            top5: 0,
            confusions: Vec::new(),
        };
        n_classes
    ];
    let mut confusion = vec![vec![0usize; n_classes]; n_classes];
    let (mut hit1, mut hit5) = (0usize, 0usize);
    let mut predictions = Vec::with_capacity(logits.len());
    for (row, &label) in logits.iter().zip(labels) {
        let rank = ranking(row);
        let pred = rank[0];
        predictions.push(pred);
        let c = &mut per_class[label];
        c.images += 1;
        confusion[label][pred] += 1;
        if pred == label {
            c.correct += 1;
            hit1 += 1;
        }
        if rank.iter().take(5).any(|&k| k == label) {
            c.top5 += 1;
            hit5 += 1;
        }
    }
    for (label, c) in per_class.iter_mut().enumerate() {
        let mut conf: Vec<(usize, usize)> = confusion[label]
            .iter()
            .enumerate()
            .filter(|&(k, &n)| k != label && n > 0)
            .map(|(k, &n)| (k, n))
            .collect();
        conf.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        c.confusions = conf;
    }
    let n = logits.len().max(1) as f64;
    let recalls: Vec<f64> = per_class.iter().filter_map(ClassStats::recall).collect();
    Metrics {
        top1: hit1 as f64 / n,
        top5: (n_classes >= 5).then_some(hit5 as f64 / n),
        mean_per_class_recall: recalls.iter().sum::<f64>() / recalls.len().max(1) as f64,
        predictions,
        per_class,
    }
}

/// Classes with pictures, worst recall first (ties: more pictures first,
/// then by index).
pub fn worst_classes(m: &Metrics) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..m.per_class.len())
        .filter(|&k| m.per_class[k].images > 0)
        .collect();
    idx.sort_by(|&a, &b| {
        let (ra, rb) = (m.per_class[a].recall(), m.per_class[b].recall());
        ra.partial_cmp(&rb)
            .unwrap_or(std::cmp::Ordering::Equal)
            .then(m.per_class[b].images.cmp(&m.per_class[a].images))
            .then(a.cmp(&b))
    });
    idx
}

/// How many of the worst classes the summary and the JSON detail.
pub const WORST_SHOWN: usize = 10;

impl ZeroShot {
    pub fn metrics(&self) -> Metrics {
        metrics(&self.logits, &self.labels, self.classes.len())
    }

    /// The report: figures, classes, the worst classes' confusions,
    /// per-picture predictions (the 5 best classes with their logits),
    /// skipped pictures and timings.
    pub fn to_json(&self, model: &Path, data: &Path) -> Value {
        let m = self.metrics();
        let c = self.classes.len();
        let name = |k: usize| self.classes[k].name.clone();
        let confusions = |s: &ClassStats| -> Vec<Value> {
            s.confusions
                .iter()
                .map(|&(k, n)| json!({"class": name(k), "index": k, "count": n}))
                .collect()
        };
        let classes: Vec<Value> = self
            .classes
            .iter()
            .zip(&m.per_class)
            .enumerate()
            .map(|(k, (cl, s))| {
                json!({
                    "index": k, "folder": cl.folder, "name": cl.name, "images": s.images,
                    "correct": s.correct, "recall": s.recall(),
                    "top5_recall": (c >= 5 && s.images > 0).then(|| s.top5 as f64 / s.images as f64),
                    "predicted_as": confusions(s),
                })
            })
            .collect();
        let worst: Vec<Value> = worst_classes(&m)
            .into_iter()
            .take(WORST_SHOWN)
            .map(|k| {
                let s = &m.per_class[k];
                json!({"class": name(k), "index": k, "recall": s.recall(), "images": s.images,
                       "correct": s.correct, "predicted_as": confusions(s)})
            })
            .collect();
        let predictions: Vec<Value> = self
            .files
            .iter()
            .zip(&self.labels)
            .zip(&self.logits)
            .zip(&m.predictions)
            .map(|(((f, &label), row), &pred)| {
                let top: Vec<Value> = ranking(row)
                    .into_iter()
                    .take(5)
                    .map(|k| json!({"class": name(k), "index": k, "logit": row[k]}))
                    .collect();
                json!({
                    "file": f.to_string_lossy(), "label": name(label), "label_index": label,
                    "prediction": name(pred), "prediction_index": pred, "correct": pred == label,
                    "top5": top,
                })
            })
            .collect();
        let skipped: Vec<Value> = self
            .skipped
            .iter()
            .map(|(p, why)| json!({"file": p.to_string_lossy(), "reason": why}))
            .collect();
        let n = self.files.len();
        json!({
            "model": model.to_string_lossy(),
            "data": data.to_string_lossy(),
            "templates": self.templates.source,
            "num_templates": self.templates.templates.len(),
            "logit_scale": LOGIT_SCALE,
            "num_classes": c,
            "num_images": n,
            "top1": m.top1,
            "top5": m.top5,
            "mean_per_class_recall": m.mean_per_class_recall,
            "chance_top1": 1.0 / c as f64,
            "chance_top5": (c >= 5).then(|| 5.0 / c as f64),
            "classes": classes,
            "worst_classes": worst,
            "predictions": predictions,
            "skipped": skipped,
            "timing": {
                "class_embeddings_s": self.text_seconds,
                "prompts": c * self.templates.templates.len(),
                "images_s": self.image_seconds,
                "images_per_s": n as f64 / self.image_seconds.max(1e-9),
                "total_s": self.total_seconds,
            },
        })
    }

    /// A few lines for people: figures against chance, the worst classes
    /// and what they were taken for, timings, skipped pictures.
    pub fn summary(&self) -> String {
        let m = self.metrics();
        let c = self.classes.len();
        let n = self.files.len();
        let pct = |x: f64| format!("{:.1}%", 100.0 * x);
        let mut s = format!(
            "zero-shot: {n} pictures, {c} classes, {} prompt templates ({})\n",
            self.templates.templates.len(),
            self.templates.source
        );
        s += &format!("top-1 {} (chance {})", pct(m.top1), pct(1.0 / c as f64));
        if let Some(t5) = m.top5 {
            s += &format!(", top-5 {} (chance {})", pct(t5), pct(5.0 / c as f64));
        }
        s += &format!(", mean per-class recall {}\n", pct(m.mean_per_class_recall));
        let worst = worst_classes(&m);
        let shown = worst.len().min(5);
        if shown > 0 {
            s +=
                &format!("worst {shown} classes (recall, right/pictures: most often taken for):\n");
            let width = worst[..shown]
                .iter()
                .map(|&k| self.classes[k].name.chars().count())
                .max()
                .unwrap_or(0);
            for &k in &worst[..shown] {
                let st = &m.per_class[k];
                let conf: Vec<String> = st
                    .confusions
                    .iter()
                    .take(3)
                    .map(|&(j, cnt)| format!("{} {cnt}", self.classes[j].name))
                    .collect();
                s += &format!(
                    "  {:<width$}  {:>6}  {}/{}{}\n",
                    self.classes[k].name,
                    pct(st.recall().unwrap_or(0.0)),
                    st.correct,
                    st.images,
                    if conf.is_empty() {
                        String::new()
                    } else {
                        format!(": {}", conf.join(", "))
                    }
                );
            }
        }
        s += &format!(
            "class embeddings: {} prompts in {:.2} s; pictures: {n} in {:.2} s ({:.1} pictures/s); total {:.2} s",
            c * self.templates.templates.len(),
            self.text_seconds,
            self.image_seconds,
            n as f64 / self.image_seconds.max(1e-9),
            self.total_seconds
        );
        if !self.skipped.is_empty() {
            s += &format!("\nskipped {} unreadable picture(s):", self.skipped.len());
            for (p, why) in self.skipped.iter().take(5) {
                s += &format!("\n  {}: {why}", p.display());
            }
            if self.skipped.len() > 5 {
                s += &format!(
                    "\n  ... and {} more (all in the JSON)",
                    self.skipped.len() - 5
                );
            }
        }
        s
    }
}

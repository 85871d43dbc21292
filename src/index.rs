//! Whole collections: `clip-wgpu embed --images DIR` (every picture under a
//! folder, recursively) or `--texts FILE` (one text per line) embedded in
//! batches into one safetensors file, resumable after a kill; and
//! `clip-wgpu search` over such a file, ranked on the GPU.
//!
//! The file (an "index"): one F32 tensor `embeddings` [N, dim] of
//! L2-normalised rows, and string metadata (safetensors' `__metadata__`):
//!
//! | key | value |
//! |---|---|
//! | `clip_wgpu` | `embeddings 1` (this layout) |
//! | `kind` | `image` or `text` |
//! | `files` | (images) JSON list of the N pictures' paths relative to `root`, row order |
//! | `texts` | (texts) JSON list of the N texts, row order (the file's lines) |
//! | `root` | the folder (or text file) embedded, absolute |
//! | `model` | the model folder that made the embeddings, absolute |
//! | `dim` | values per row |
//! | `logit_scale` | the model's exp(logit_scale) (CLIP logits = it x the dot product) |
//! | `skipped` | (images) JSON list of `[path, reason]`: files that could not be read |
//!
//! In Python: `safetensors.numpy.load_file(p)["embeddings"]` and
//! `json.loads(safetensors.safe_open(p, "np").metadata()["files"])`.
//!
//! Resuming: every `checkpoint_every` batches the rows so far are on disk in
//! `OUTPUT.partial` (raw little-endian f32, appended) and the state in
//! `OUTPUT.partial.json` (written by rename after the rows are synced: the
//! rows it counts, the loader position, the pictures skipped, the kernel
//! choices used). A rerun of the same command finds them, drops rows past
//! the recorded count, pins the same kernel choices, and continues with the
//! batches an uninterrupted run would have made, so the final file is the
//! same byte for byte. A different model, folder content or batch size
//! starts over. The final file is written by rename too.

use crate::data::loader::{Loader, LoaderConfig};
use crate::data::sources::{Example, ImageSource, IMAGE_EXTENSIONS};
use crate::embed::Embedder;
use crate::model::weights::write_atomic;
use crate::ops::topk::rank;
use crate::Gpu;
use anyhow::{bail, ensure, Context, Result};
use serde_json::{json, Map, Value};
use std::collections::BTreeMap;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

/// The `clip_wgpu` metadata value of this layout.
pub const FORMAT: &str = "embeddings 1";

/// What `embed` embeds.
#[derive(Clone, Debug)]
pub enum Collection {
    /// Every picture under a folder (recursively; by extension: png, jpg,
    /// jpeg, webp, gif, bmp), in the order of their relative paths.
    Images(PathBuf),
    /// A text file, one text per line.
    Texts(PathBuf),
}

#[derive(Clone, Debug)]
pub struct EmbedOptions {
    pub model: PathBuf,
    pub collection: Collection,
    pub output: PathBuf,
    /// Pictures or texts per batch.
    pub batch: usize,
    /// Batches between two checkpoints of the partial results.
    pub checkpoint_every: usize,
    /// Picture decoding threads.
    pub workers: usize,
    /// A progress bar on a terminal (else a line per checkpoint).
    pub progress: bool,
}

/// What a run did.
#[derive(Clone, Debug)]
pub struct EmbedReport {
    pub rows: usize,
    pub skipped: usize,
    /// Rows found in a partial file and kept.
    pub resumed_rows: usize,
    pub seconds: f64,
}

/// Every picture file under `root` (by extension; links to folders not
/// followed), as paths relative to it, sorted.
pub fn list_images(root: &Path) -> Result<Vec<PathBuf>> {
    ensure!(root.is_dir(), "{} is not a folder", root.display());
    let mut out = Vec::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let dir = root.join(&rel);
        let entries =
            std::fs::read_dir(&dir).with_context(|| format!("listing {}", dir.display()))?;
        for e in entries {
            let e = e.with_context(|| format!("listing {}", dir.display()))?;
            let p = rel.join(e.file_name());
            // Symbolic links to folders are not followed (no cycles).
            if e.file_type()?.is_dir() {
                stack.push(p);
            } else if p
                .extension()
                .and_then(|x| x.to_str())
                .is_some_and(|x| IMAGE_EXTENSIONS.iter().any(|e| x.eq_ignore_ascii_case(e)))
            {
                out.push(p);
            }
        }
    }
    out.sort();
    Ok(out)
}

/// FNV-1a, 64 bits: a stable fingerprint of what a partial file was made
/// from.
fn fnv(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf29ce484222325;
    for p in parts {
        for b in p.iter().chain(&[0xff]) {
            h ^= *b as u64;
            h = h.wrapping_mul(0x100000001b3);
        }
    }
    h
}

/// Sizes and modification times of the model folder's files: a retrained
/// model in the same folder does not continue another's partial results.
fn model_stamp(dir: &Path) -> Result<String> {
    let mut names: Vec<(String, u64, u128)> = Vec::new();
    for e in std::fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
        let e = e?;
        let m = e.metadata()?;
        if m.is_file() {
            let t = m
                .modified()
                .ok()
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .map_or(0, |d| d.as_nanos());
            names.push((e.file_name().to_string_lossy().into_owned(), m.len(), t));
        }
    }
    names.sort();
    Ok(format!("{:016x}", fnv(&[format!("{names:?}").as_bytes()])))
}

fn partial_paths(output: &Path) -> (PathBuf, PathBuf) {
    let name = output
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "embeddings".into());
    let dir = output.parent().unwrap_or(Path::new(""));
    (
        dir.join(format!("{name}.partial")),
        dir.join(format!("{name}.partial.json")),
    )
}

/// The recorded state of a partial run.
#[derive(Clone, Debug, PartialEq)]
struct State {
    /// Identifies the run: kind, model, collection, batch size.
    run: Value,
    rows: usize,
    position: usize,
    skipped: Vec<(String, String)>,
    kernel_choices: BTreeMap<String, String>,
}

impl State {
    fn to_json(&self) -> Value {
        json!({
            "run": self.run,
            "rows": self.rows,
            "position": self.position,
            "skipped": self.skipped,
            "kernel_choices": self.kernel_choices,
        })
    }

    fn from_json(v: &Value) -> Option<State> {
        Some(State {
            run: v.get("run")?.clone(),
            rows: v.get("rows")?.as_u64()? as usize,
            position: v.get("position")?.as_u64()? as usize,
            skipped: serde_json::from_value(v.get("skipped")?.clone()).ok()?,
            kernel_choices: serde_json::from_value(v.get("kernel_choices")?.clone()).ok()?,
        })
    }
}

/// Test hook: after this batch's rows are written (`CLIP_WGPU_TEST_EMBED_HOLD`),
/// log so and wait to be killed.
fn test_hold(batch: usize) {
    if std::env::var("CLIP_WGPU_TEST_EMBED_HOLD")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        == Some(batch)
    {
        crate::stderr_line(&format!(
            "[clip-wgpu] test hold: batch {batch} written, waiting to be killed"
        ));
        loop {
            std::thread::sleep(std::time::Duration::from_secs(3600));
        }
    }
}

/// Embed a collection into `opts.output` (see the module documentation).
pub fn embed_collection(gpu: &Arc<Gpu>, opts: &EmbedOptions) -> Result<EmbedReport> {
    let t0 = Instant::now();
    ensure!(opts.batch > 0, "--batch must be at least 1");
    ensure!(
        opts.checkpoint_every > 0,
        "--checkpoint-every must be at least 1"
    );
    let model_dir = std::fs::canonicalize(&opts.model)
        .with_context(|| format!("model folder {}", opts.model.display()))?;
    let m = Embedder::load(gpu, &model_dir)?;
    let dim = m.dim();
    // What is embedded, and the run's identity.
    let (kind, root, names): (&str, PathBuf, Vec<String>) = match &opts.collection {
        Collection::Images(dir) => {
            let root =
                std::fs::canonicalize(dir).with_context(|| format!("folder {}", dir.display()))?;
            let files = list_images(&root)?;
            let names = files
                .iter()
                .map(|p| p.to_string_lossy().into_owned())
                .collect();
            ("image", root, names)
        }
        Collection::Texts(file) => {
            let root = std::fs::canonicalize(file)
                .with_context(|| format!("text file {}", file.display()))?;
            let text = std::fs::read_to_string(&root).with_context(|| {
                format!("reading {} (UTF-8 text, one per line)", root.display())
            })?;
            ("text", root, text.lines().map(str::to_string).collect())
        }
    };
    let joined = names.join("\n");
    let run = json!({
        "kind": kind,
        "model": model_dir.to_string_lossy(),
        "model_stamp": model_stamp(&model_dir)?,
        "root": root.to_string_lossy(),
        "count": names.len(),
        "content": format!("{:016x}", fnv(&[joined.as_bytes()])),
        "batch": opts.batch,
    });
    let (data_path, state_path) = partial_paths(&opts.output);
    let mut state = State {
        run: run.clone(),
        rows: 0,
        position: 0,
        skipped: Vec::new(),
        kernel_choices: BTreeMap::new(),
    };
    let mut resumed_rows = 0;
    if let Some(old) = read_state(&state_path) {
        let data_len = std::fs::metadata(&data_path).map(|m| m.len()).unwrap_or(0);
        if old.run != run {
            log(&format!(
                "{} was made from another model, collection or batch size: starting over",
                state_path.display()
            ));
        } else if data_len < (old.rows * dim * 4) as u64 {
            log(&format!(
                "{} holds fewer rows than {} records: starting over",
                data_path.display(),
                state_path.display()
            ));
        } else {
            gpu.pin_kernel_choices(&old.kernel_choices);
            resumed_rows = old.rows;
            log(&format!(
                "resuming from {}: {} of {} {kind}s done",
                state_path.display(),
                old.position,
                names.len()
            ));
            state = old;
        }
    }
    // The rows so far, and nothing after them.
    let mut data = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(&data_path)
        .with_context(|| format!("opening {}", data_path.display()))?;
    data.set_len((state.rows * dim * 4) as u64)?;
    data.seek(SeekFrom::End(0))?;
    let bar = progress_bar(
        opts.progress,
        names.len() as u64,
        state.position as u64,
        kind,
    );
    let mut batches = 0usize;
    let checkpoint = |state: &mut State, data: &std::fs::File| -> Result<()> {
        data.sync_data()?;
        state.kernel_choices = gpu.kernel_choices();
        write_atomic(
            &state_path,
            serde_json::to_string(&state.to_json())?.as_bytes(),
        )
    };
    let total = names.len();
    let report = |state: &State, t: Instant, done_before: usize| {
        let rate = (state.position - done_before) as f64 / t.elapsed().as_secs_f64().max(1e-9);
        match &bar {
            Some(b) => b.set_position(state.position as u64),
            None => log(&format!(
                "embedded {} of {total} {kind}s ({rate:.1}/s)",
                state.position
            )),
        }
    };
    let started = (Instant::now(), state.position);
    match &opts.collection {
        Collection::Images(_) => {
            let examples: Vec<Example> = names
                .iter()
                .enumerate()
                .map(|(i, n)| Example {
                    image: ImageSource::File(root.join(n)),
                    caption: String::new(),
                    image_id: i as u64,
                })
                .collect();
            let mut ld = Loader::new(
                Arc::new(examples),
                (0..total).collect(),
                state.position,
                LoaderConfig {
                    batch_size: opts.batch,
                    max_len: 8,
                    workers: opts.workers.max(1),
                    prefetch: 4,
                    drop_last: false,
                    refill: true,
                },
                m.processor()?.clone(),
                m.tokenizer()?.clone(),
            )?;
            while let Some(b) = ld.next_batch()? {
                for (p, why) in &b.skipped {
                    let rel = p
                        .strip_prefix(&root)
                        .unwrap_or(p)
                        .to_string_lossy()
                        .into_owned();
                    log(&format!("skipped {rel}: {why}"));
                    state.skipped.push((rel, why.clone()));
                }
                let e = m.embed_pixels(&b.pixels, b.batch)?;
                data.write_all(bytemuck::cast_slice(&e))?;
                state.rows += b.batch;
                state.position = ld.position();
                batches += 1;
                if batches.is_multiple_of(opts.checkpoint_every) {
                    checkpoint(&mut state, &data)?;
                    report(&state, started.0, started.1);
                } else if let Some(b) = &bar {
                    b.set_position(state.position as u64);
                }
                test_hold(batches);
            }
            // Pictures after the last batch's were all unreadable (the
            // loader ended without one): their reasons, read again.
            let processor = m.processor()?;
            for n in &names[state.position..] {
                let why =
                    crate::data::loader::load_pixels(&ImageSource::File(root.join(n)), processor)
                        .err()
                        .unwrap_or_else(|| "could not be read".into());
                log(&format!("skipped {n}: {why}"));
                state.skipped.push((n.clone(), why));
            }
            state.position = total;
        }
        Collection::Texts(_) => {
            while state.position < total {
                let end = (state.position + opts.batch).min(total);
                let e = m.embed_texts(&names[state.position..end])?;
                data.write_all(bytemuck::cast_slice(&e))?;
                state.rows += end - state.position;
                state.position = end;
                batches += 1;
                if batches.is_multiple_of(opts.checkpoint_every) {
                    checkpoint(&mut state, &data)?;
                    report(&state, started.0, started.1);
                } else if let Some(b) = &bar {
                    b.set_position(state.position as u64);
                }
                test_hold(batches);
            }
        }
    }
    checkpoint(&mut state, &data)?;
    if let Some(b) = &bar {
        b.finish_and_clear();
    }
    // The final file: header, then the rows copied from the partial file.
    let mut meta = BTreeMap::new();
    meta.insert("clip_wgpu".to_string(), FORMAT.to_string());
    meta.insert("kind".to_string(), kind.to_string());
    meta.insert(
        "model".to_string(),
        model_dir.to_string_lossy().into_owned(),
    );
    meta.insert("root".to_string(), root.to_string_lossy().into_owned());
    meta.insert("dim".to_string(), dim.to_string());
    meta.insert("logit_scale".to_string(), format!("{}", m.logit_scale()?));
    if kind == "image" {
        let skipped: std::collections::HashSet<&str> =
            state.skipped.iter().map(|(r, _)| r.as_str()).collect();
        let files: Vec<&String> = names
            .iter()
            .filter(|n| !skipped.contains(n.as_str()))
            .collect();
        ensure!(
            files.len() == state.rows,
            "{} pictures embedded but {} listed as read: was the folder changed during the run?",
            state.rows,
            files.len()
        );
        meta.insert("files".to_string(), serde_json::to_string(&files)?);
        meta.insert(
            "skipped".to_string(),
            serde_json::to_string(&state.skipped)?,
        );
    } else {
        meta.insert("texts".to_string(), serde_json::to_string(&names)?);
    }
    data.seek(SeekFrom::Start(0))?;
    write_index(&opts.output, &meta, state.rows, dim, &mut data)?;
    drop(data);
    let _ = std::fs::remove_file(&state_path);
    let _ = std::fs::remove_file(&data_path);
    Ok(EmbedReport {
        rows: state.rows,
        skipped: state.skipped.len(),
        resumed_rows,
        seconds: t0.elapsed().as_secs_f64(),
    })
}

fn log(msg: &str) {
    crate::stderr_line(&format!("[clip-wgpu] {msg}"));
}

fn progress_bar(
    enabled: bool,
    total: u64,
    start: u64,
    kind: &str,
) -> Option<indicatif::ProgressBar> {
    use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
    use std::io::IsTerminal;
    if !enabled || !std::io::stderr().is_terminal() {
        return None;
    }
    let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
    bar.set_style(
        ProgressStyle::with_template(&format!(
            "{{bar:30}} {{pos}}/{{len}} {kind}s  {{per_sec}}  ETA {{eta}}"
        ))
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar.set_position(start);
    Some(bar)
}

fn read_state(path: &Path) -> Option<State> {
    let bytes = std::fs::read(path).ok()?;
    State::from_json(&serde_json::from_slice(&bytes).ok()?)
}

/// Write a safetensors file holding `embeddings` [rows, dim] (f32, read
/// from `data`) and `meta`, through a temporary file and a rename. The
/// header's keys are sorted, so the same content gives the same bytes.
fn write_index(
    path: &Path,
    meta: &BTreeMap<String, String>,
    rows: usize,
    dim: usize,
    data: &mut impl Read,
) -> Result<()> {
    let bytes = (rows * dim * 4) as u64;
    let mut header = Map::new();
    header.insert("__metadata__".into(), json!(meta));
    header.insert(
        "embeddings".into(),
        json!({"dtype": "F32", "shape": [rows, dim], "data_offsets": [0, bytes]}),
    );
    let mut h = serde_json::to_vec(&Value::Object(header))?;
    h.resize(h.len().next_multiple_of(8), b' ');
    let tmp = path.with_extension(format!(
        "{}.tmp",
        path.extension().and_then(|e| e.to_str()).unwrap_or("")
    ));
    {
        let mut f = std::io::BufWriter::new(
            std::fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?,
        );
        f.write_all(&(h.len() as u64).to_le_bytes())?;
        f.write_all(&h)?;
        let copied = std::io::copy(&mut data.take(bytes), &mut f)?;
        ensure!(
            copied == bytes,
            "the partial file holds {copied} bytes of rows, expected {bytes}"
        );
        let f = f.into_inner().map_err(|e| e.into_error())?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)
        .with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))?;
    Ok(())
}

/// An embeddings file, loaded.
#[derive(Clone, Debug)]
pub struct Index {
    /// `image` or `text`.
    pub kind: String,
    pub dim: usize,
    /// [len, dim], row-major.
    pub embeddings: Vec<f32>,
    /// Each row's picture (relative to `root`) or text.
    pub names: Vec<String>,
    pub root: Option<PathBuf>,
    /// The model folder that made it.
    pub model: Option<PathBuf>,
    pub metadata: BTreeMap<String, String>,
}

impl Index {
    pub fn load(path: &Path) -> Result<Index> {
        let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        let st = safetensors::SafeTensors::deserialize(&bytes)
            .map_err(|e| anyhow::anyhow!("{}: not a safetensors file: {e}", path.display()))?;
        let (_, header) = safetensors::SafeTensors::read_metadata(&bytes)
            .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        let metadata: BTreeMap<String, String> = header
            .metadata()
            .clone()
            .unwrap_or_default()
            .into_iter()
            .collect();
        let t = st.tensor("embeddings").map_err(|_| {
            anyhow::anyhow!(
                "{}: no `embeddings` tensor (is it a file `clip-wgpu embed --images/--texts` wrote?)",
                path.display()
            )
        })?;
        ensure!(
            t.dtype() == safetensors::Dtype::F32 && t.shape().len() == 2,
            "{}: `embeddings` is {:?} {:?}, expected F32 [N, dim]",
            path.display(),
            t.dtype(),
            t.shape()
        );
        let (n, dim) = (t.shape()[0], t.shape()[1]);
        let embeddings: Vec<f32> = bytemuck::pod_collect_to_vec(t.data());
        let kind = metadata.get("kind").cloned().unwrap_or_default();
        let list = match kind.as_str() {
            "image" => "files",
            "text" => "texts",
            k => bail!(
                "{}: metadata kind {k:?}, expected image or text",
                path.display()
            ),
        };
        let names: Vec<String> = serde_json::from_str(
            metadata
                .get(list)
                .with_context(|| format!("{}: no `{list}` in the metadata", path.display()))?,
        )
        .with_context(|| {
            format!(
                "{}: metadata `{list}` is not a JSON list of strings",
                path.display()
            )
        })?;
        ensure!(
            names.len() == n,
            "{}: {n} embeddings but {} {list}",
            path.display(),
            names.len()
        );
        Ok(Index {
            kind,
            dim,
            embeddings,
            names,
            root: metadata.get("root").map(PathBuf::from),
            model: metadata.get("model").map(PathBuf::from),
            metadata,
        })
    }

    pub fn len(&self) -> usize {
        self.names.len()
    }

    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }

    /// Row `i`'s picture path (under `root`) or text.
    pub fn display_name(&self, i: usize) -> String {
        match (&self.root, self.kind.as_str()) {
            (Some(r), "image") => r.join(&self.names[i]).to_string_lossy().into_owned(),
            _ => self.names[i].clone(),
        }
    }
}

/// What to look for.
#[derive(Clone, Debug)]
pub enum Query {
    Text(String),
    Image(PathBuf),
}

/// One result: its rank (0 = best), row in the index and similarity
/// (cosine: both sides are L2-normalised).
#[derive(Clone, Debug, PartialEq)]
pub struct Hit {
    pub rank: usize,
    pub row: usize,
    pub score: f32,
}

/// Seconds spent in each part of a search.
#[derive(Clone, Debug, Default)]
pub struct SearchTimes {
    pub model_s: f64,
    pub query_s: f64,
    pub rank_s: f64,
}

/// The `top` rows of `index` most similar to `query` embedded by `model`
/// (loaded from `model_dir`), ranked on the GPU ([`rank`]: a matmul and a
/// top-k; ties to the lower row).
pub fn search_with(
    m: &Embedder,
    index: &Index,
    query: &Query,
    top: usize,
) -> Result<(Vec<Hit>, f64, f64)> {
    ensure!(
        m.dim() == index.dim,
        "the model makes {}-value embeddings, the index holds {}",
        m.dim(),
        index.dim
    );
    let t = Instant::now();
    let q = match query {
        Query::Text(s) => m.embed_texts(&[s.as_str()])?,
        Query::Image(p) => m.embed_image_files(std::slice::from_ref(p))?,
    };
    let query_s = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let r = rank(m.gpu(), &q, &index.embeddings, index.dim, top)?;
    let rank_s = t.elapsed().as_secs_f64();
    let hits = r
        .row(0)
        .iter()
        .zip(r.row_values(0))
        .enumerate()
        .map(|(rank, (&row, &score))| Hit {
            rank,
            row: row as usize,
            score,
        })
        .collect();
    Ok((hits, query_s, rank_s))
}

/// [`search_with`], loading the model (`model_dir`, else the one the index
/// records).
pub fn search(
    gpu: &Arc<Gpu>,
    index: &Index,
    model_dir: Option<&Path>,
    query: &Query,
    top: usize,
) -> Result<(Vec<Hit>, SearchTimes)> {
    let dir = match model_dir {
        Some(d) => d.to_path_buf(),
        None => index
            .model
            .clone()
            .context("the index does not record its model folder: give --model")?,
    };
    let t = Instant::now();
    let m = Embedder::load(gpu, &dir)?;
    let model_s = t.elapsed().as_secs_f64();
    let (hits, query_s, rank_s) = search_with(&m, index, query, top)?;
    Ok((
        hits,
        SearchTimes {
            model_s,
            query_s,
            rank_s,
        },
    ))
}

/// The command lines of `embed --images/--texts` and `search`.
pub mod cli {
    use super::*;

    /// `embed`'s flags for a whole collection.
    #[derive(clap::Args, Clone, Debug)]
    pub struct EmbedArgs {
        /// Embed every picture under this folder (recursively) into --output
        /// (a safetensors file).
        #[arg(long, conflicts_with = "texts")]
        pub images: Option<PathBuf>,
        /// Embed each line of this text file into --output.
        #[arg(long)]
        pub texts: Option<PathBuf>,
        /// Pictures or texts per batch.
        #[arg(long, default_value_t = 64)]
        pub batch: usize,
        /// Batches between two checkpoints of the partial results
        /// (OUTPUT.partial, OUTPUT.partial.json; a rerun continues from them).
        #[arg(long, alias = "checkpoint_every", default_value_t = 16)]
        pub checkpoint_every: usize,
        /// Picture decoding threads (default: the cores, at most 8).
        #[arg(long)]
        pub workers: Option<usize>,
        /// No progress bar (a line per checkpoint instead).
        #[arg(long, alias = "no_progress")]
        pub no_progress: bool,
    }

    impl EmbedArgs {
        /// Whether a collection was asked for.
        pub fn given(&self) -> bool {
            self.images.is_some() || self.texts.is_some()
        }
    }

    /// `embed --images DIR | --texts FILE --output FILE`.
    pub fn embed(
        gpu: &Arc<Gpu>,
        model: PathBuf,
        output: Option<PathBuf>,
        a: EmbedArgs,
    ) -> Result<()> {
        let output = output.context("--images / --texts need --output FILE.safetensors")?;
        let collection = match (a.images, a.texts) {
            (Some(d), None) => Collection::Images(d),
            (None, Some(f)) => Collection::Texts(f),
            _ => bail!("give --images DIR or --texts FILE"),
        };
        let workers = a
            .workers
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get().min(8)));
        let r = embed_collection(
            gpu,
            &EmbedOptions {
                model,
                collection,
                output: output.clone(),
                batch: a.batch,
                checkpoint_every: a.checkpoint_every,
                workers,
                progress: !a.no_progress,
            },
        )?;
        let resumed = if r.resumed_rows > 0 {
            format!(
                ", {} of them from the partial results of an earlier run",
                r.resumed_rows
            )
        } else {
            String::new()
        };
        let skipped = if r.skipped > 0 {
            format!(
                ", {} unreadable skipped (listed in the file's metadata)",
                r.skipped
            )
        } else {
            String::new()
        };
        log(&format!(
            "wrote {}: {} embeddings{resumed}{skipped} in {:.1} s",
            output.display(),
            r.rows,
            r.seconds
        ));
        Ok(())
    }

    #[derive(clap::Args, Clone, Debug)]
    pub struct SearchArgs {
        /// An embeddings file written by `embed --images` or `--texts`.
        #[arg(long)]
        pub index: PathBuf,
        /// Find the entries most similar to this text.
        #[arg(long, conflicts_with = "image", required_unless_present = "image")]
        pub text: Option<String>,
        /// Find the entries most similar to this picture.
        #[arg(long)]
        pub image: Option<PathBuf>,
        /// How many results.
        #[arg(long, default_value_t = 10)]
        pub top: usize,
        /// Model folder to embed the query with (default: the one the index
        /// records; it must be the model that made the index).
        #[arg(long)]
        pub model: Option<PathBuf>,
        /// One JSON object instead of lines of rank, similarity and entry.
        #[arg(long)]
        pub json: bool,
    }

    /// `search`: prints the results (rank, cosine similarity, picture path
    /// or text), and the time of each part on stderr.
    pub fn search(gpu: &Arc<Gpu>, a: SearchArgs) -> Result<()> {
        ensure!(a.top > 0, "--top must be at least 1");
        let t = Instant::now();
        let index = Index::load(&a.index)?;
        let load_s = t.elapsed().as_secs_f64();
        let query = match (a.text, a.image) {
            (Some(t), None) => Query::Text(t),
            (None, Some(p)) => Query::Image(p),
            _ => bail!("give --text or --image"),
        };
        let (hits, times) = super::search(gpu, &index, a.model.as_deref(), &query, a.top)?;
        log(&format!(
            "searched {} {}s: index loaded in {:.0} ms, model in {:.0} ms, query embedded in {:.0} ms, \
             ranked in {:.1} ms",
            index.len(),
            index.kind,
            load_s * 1e3,
            times.model_s * 1e3,
            times.query_s * 1e3,
            times.rank_s * 1e3
        ));
        if a.json {
            let key = if index.kind == "image" {
                "file"
            } else {
                "text"
            };
            let list: Vec<Value> = hits
                .iter()
                .map(|h| json!({"rank": h.rank + 1, "score": h.score, "row": h.row, key: index.display_name(h.row)}))
                .collect();
            let q = match &query {
                Query::Text(t) => json!({"text": t}),
                Query::Image(p) => json!({"image": p.to_string_lossy()}),
            };
            println!("{}", json!({"query": q, "results": list}));
        } else {
            for h in &hits {
                println!(
                    "{}\t{:.4}\t{}",
                    h.rank + 1,
                    h.score,
                    index.display_name(h.row)
                );
            }
        }
        Ok(())
    }
}

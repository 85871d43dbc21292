//! What a training run reports: image-text retrieval recall@K, a JSON-lines
//! metrics log, and a PNG chart of the loss and learning rate (plotters).

use anyhow::{bail, ensure, Context, Result};
use image::RgbImage;
use serde_json::{Map, Value};
use std::collections::HashMap;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

// ---------------------------------------------------------------------------
// Recall@K

/// Retrieval recall@K, as fractions in [0, 1], in the order of the `ks` asked
/// for.
#[derive(Clone, Debug, PartialEq)]
pub struct Recall {
    /// Image-to-text: an image is a hit when any of its captions is among
    /// the K texts most similar to it. Images without captions are not
    /// counted.
    pub i2t: Vec<(usize, f64)>,
    /// Text-to-image: a caption is a hit when its image is among the K
    /// images most similar to it.
    pub t2i: Vec<(usize, f64)>,
}

impl Recall {
    /// `("i2t_recall@K", value)` then `("t2i_recall@K", value)` pairs, for
    /// logs (the Trainer prefixes eval metrics with `eval_`).
    pub fn named(&self) -> Vec<(String, f64)> {
        let mut v: Vec<(String, f64)> = self
            .i2t
            .iter()
            .map(|(k, r)| (format!("i2t_recall@{k}"), *r))
            .collect();
        v.extend(
            self.t2i
                .iter()
                .map(|(k, r)| (format!("t2i_recall@{k}"), *r)),
        );
        v
    }
}

/// Which image each text belongs to, as an index into the images.
fn text_owners(ids_of_texts: &[u64], ids_of_images: &[u64]) -> Result<Vec<usize>> {
    let mut index: HashMap<u64, usize> = HashMap::with_capacity(ids_of_images.len());
    for (i, id) in ids_of_images.iter().enumerate() {
        ensure!(
            index.insert(*id, i).is_none(),
            "image id {id} appears twice among the images (images must be unique)"
        );
    }
    ids_of_texts
        .iter()
        .enumerate()
        .map(|(t, id)| {
            index.get(id).copied().with_context(|| {
                format!("text {t} belongs to image id {id}, which is not among the images")
            })
        })
        .collect()
}

fn check_ks(ks: &[usize]) -> Result<()> {
    ensure!(!ks.is_empty(), "recall: no K given");
    ensure!(
        ks.iter().all(|&k| k >= 1),
        "recall: every K must be at least 1"
    );
    Ok(())
}

/// Ranks and hit counts, accumulated one image row of similarities at a
/// time, so the images x texts matrix never has to exist whole.
struct RankCounter<'a> {
    owner: &'a [usize],
    /// Captions of each image, ascending.
    captions: Vec<Vec<usize>>,
    /// `sim(owner[t], t)` for every text t.
    own: Vec<f64>,
    /// Rank of each image's best caption among all texts.
    i2t_rank: Vec<Option<usize>>,
    /// Images ranked above each text's own image.
    t2i_rank: Vec<usize>,
}

impl<'a> RankCounter<'a> {
    fn new(owner: &'a [usize], n_images: usize, own: Vec<f64>) -> Self {
        let mut captions = vec![Vec::new(); n_images];
        for (t, &i) in owner.iter().enumerate() {
            captions[i].push(t);
        }
        RankCounter {
            owner,
            captions,
            own,
            i2t_rank: vec![None; n_images],
            t2i_rank: vec![0; owner.len()],
        }
    }

    /// One image's similarities to every text. Ties go to the lower index:
    /// a text (or image) ranks above another of equal score when its index
    /// is lower.
    fn image_row(&self, i: usize, row: &[f64]) -> (Option<usize>, Vec<u32>) {
        // Image to text: rank of the best own caption (highest score, lowest
        // index among equals).
        let mut best: Option<usize> = None;
        for &t in &self.captions[i] {
            if best.is_none_or(|b| row[t] > row[b]) {
                best = Some(t);
            }
        }
        let rank = best.map(|b| {
            let sb = row[b];
            row.iter()
                .enumerate()
                .filter(|&(t, &s)| s > sb || (s == sb && t < b))
                .count()
        });
        // Text to image: does this image outrank each text's own image?
        let above: Vec<u32> = row
            .iter()
            .enumerate()
            .map(|(t, &s)| {
                let o = self.owner[t];
                let so = self.own[t];
                u32::from(o != i && (s > so || (s == so && i < o)))
            })
            .collect();
        (rank, above)
    }

    fn finish(self, ks: &[usize]) -> Recall {
        let with_captions: Vec<usize> = self.i2t_rank.iter().flatten().copied().collect();
        let frac = |hits: usize, n: usize| if n == 0 { 0.0 } else { hits as f64 / n as f64 };
        Recall {
            i2t: ks
                .iter()
                .map(|&k| {
                    let hits = with_captions.iter().filter(|&&r| r < k).count();
                    (k, frac(hits, with_captions.len()))
                })
                .collect(),
            t2i: ks
                .iter()
                .map(|&k| {
                    let hits = self.t2i_rank.iter().filter(|&&r| r < k).count();
                    (k, frac(hits, self.t2i_rank.len()))
                })
                .collect(),
        }
    }
}

/// Run `row_of(i)` for every image on all CPU cores and accumulate ranks.
/// Results do not depend on the thread count (integer counts only).
fn count_ranks(
    counter: &mut RankCounter,
    n_images: usize,
    row_of: &(dyn Fn(usize) -> Vec<f64> + Sync),
) -> Result<()> {
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .clamp(1, n_images.max(1));
    let chunk = n_images.div_ceil(threads).max(1);
    let n_texts = counter.owner.len();
    #[allow(clippy::type_complexity)]
    let results: Vec<Result<(Vec<(usize, Option<usize>)>, Vec<usize>)>> =
        std::thread::scope(|sc| {
            let c = &*counter;
            let handles: Vec<_> = (0..n_images)
                .step_by(chunk)
                .map(|start| {
                    sc.spawn(move || {
                        let mut ranks = Vec::new();
                        let mut above = vec![0usize; n_texts];
                        for i in start..(start + chunk).min(n_images) {
                            let row = row_of(i);
                            if let Some(t) = row.iter().position(|s| s.is_nan()) {
                                bail!("recall: similarity of image {i} and text {t} is NaN");
                            }
                            let (r, a) = c.image_row(i, &row);
                            ranks.push((i, r));
                            for (acc, x) in above.iter_mut().zip(a) {
                                *acc += x as usize;
                            }
                        }
                        Ok((ranks, above))
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("recall worker panicked"))
                .collect()
        });
    for r in results {
        let (ranks, above) = r?;
        for (i, rank) in ranks {
            counter.i2t_rank[i] = rank;
        }
        for (acc, x) in counter.t2i_rank.iter_mut().zip(above) {
            *acc += x;
        }
    }
    Ok(())
}

fn dot(a: &[f32], b: &[f32]) -> f64 {
    a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum()
}

/// Recall@K of image-to-text and text-to-image retrieval by cosine
/// similarity. The embeddings must be L2-normalized already (the score is
/// their dot product, accumulated in f64). Text `t` belongs to the image
/// whose id is `image_ids_of_texts[t]`; `image_ids_of_images` are unique.
/// Ties rank the lower index first. Runs on all CPU cores without
/// materializing the similarity matrix.
pub fn recall_at_k(
    image_embeds: &[Vec<f32>],
    text_embeds: &[Vec<f32>],
    image_ids_of_texts: &[u64],
    image_ids_of_images: &[u64],
    ks: &[usize],
) -> Result<Recall> {
    check_ks(ks)?;
    ensure!(
        image_embeds.len() == image_ids_of_images.len(),
        "recall: {} image embeddings but {} image ids",
        image_embeds.len(),
        image_ids_of_images.len()
    );
    ensure!(
        text_embeds.len() == image_ids_of_texts.len(),
        "recall: {} text embeddings but {} text image ids",
        text_embeds.len(),
        image_ids_of_texts.len()
    );
    let dim = image_embeds
        .first()
        .or(text_embeds.first())
        .map_or(0, |v| v.len());
    for (what, set) in [("image", image_embeds), ("text", text_embeds)] {
        for (i, v) in set.iter().enumerate() {
            ensure!(
                v.len() == dim,
                "recall: {what} embedding {i} has {} values, expected {dim}",
                v.len()
            );
            ensure!(
                v.iter().all(|x| x.is_finite()),
                "recall: {what} embedding {i} is not finite"
            );
        }
    }
    let owner = text_owners(image_ids_of_texts, image_ids_of_images)?;
    let own: Vec<f64> = owner
        .iter()
        .enumerate()
        .map(|(t, &i)| dot(&image_embeds[i], &text_embeds[t]))
        .collect();
    let mut counter = RankCounter::new(&owner, image_embeds.len(), own);
    let row_of = |i: usize| -> Vec<f64> {
        text_embeds
            .iter()
            .map(|t| dot(&image_embeds[i], t))
            .collect()
    };
    count_ranks(&mut counter, image_embeds.len(), &row_of)?;
    Ok(counter.finish(ks))
}

/// [`recall_at_k`] ranked on the GPU: the embeddings flat ([images, dim],
/// [texts, dim]), by dot product in f32 with the same tie rule (the lower
/// index first), from one matmul block by block
/// ([`crate::ops::topk::rank_with_positions`]): each image's best max(K)
/// texts (a top-k of the rows) and each text's image's position among all
/// images for that text (a count down the columns). An image is an
/// image-to-text hit at K when one of its captions is among its best K,
/// exactly when its best caption's rank is below K; a text is a hit when
/// its image's position is below K. The same values as [`recall_at_k`] but
/// where two similarities are closer than f32 rounding (about 1e-7).
pub fn recall_at_k_gpu(
    gpu: &std::sync::Arc<crate::Gpu>,
    image_embeds: &[f32],
    text_embeds: &[f32],
    dim: usize,
    image_ids_of_texts: &[u64],
    image_ids_of_images: &[u64],
    ks: &[usize],
) -> Result<Recall> {
    use crate::ops::topk::rank_with_positions;
    check_ks(ks)?;
    let (n_images, n_texts) = (image_ids_of_images.len(), image_ids_of_texts.len());
    ensure!(
        image_embeds.len() == n_images * dim && text_embeds.len() == n_texts * dim,
        "recall: {} image and {} text values for {n_images} images and {n_texts} texts of {dim}",
        image_embeds.len(),
        text_embeds.len()
    );
    for (what, set) in [("image", image_embeds), ("text", text_embeds)] {
        if let Some(p) = set.iter().position(|x| !x.is_finite()) {
            bail!("recall: {what} embedding {} is not finite", p / dim.max(1));
        }
    }
    let owner = text_owners(image_ids_of_texts, image_ids_of_images)?;
    let kmax = *ks.iter().max().unwrap();
    let owners: Vec<u32> = owner.iter().map(|&i| i as u32).collect();
    let (i2t, t2i) = rank_with_positions(gpu, image_embeds, text_embeds, dim, kmax, &owners)?;
    let mut has_caption = vec![false; n_images];
    for &i in &owner {
        has_caption[i] = true;
    }
    // Position of the first own caption among each image's best (None:
    // not among them), and of each text's image among all images.
    let i2t_pos: Vec<Option<usize>> = (0..n_images)
        .filter(|&i| has_caption[i])
        .map(|i| i2t.row(i).iter().position(|&t| owner[t as usize] == i))
        .collect();
    let t2i_pos: Vec<Option<usize>> = t2i.iter().map(|&p| Some(p as usize)).collect();
    let frac = |pos: &[Option<usize>], k: usize| {
        if pos.is_empty() {
            0.0
        } else {
            pos.iter().filter(|p| p.is_some_and(|p| p < k)).count() as f64 / pos.len() as f64
        }
    };
    Ok(Recall {
        i2t: ks.iter().map(|&k| (k, frac(&i2t_pos, k))).collect(),
        t2i: ks.iter().map(|&k| (k, frac(&t2i_pos, k))).collect(),
    })
}

/// [`recall_at_k`] from a precomputed similarity matrix (`sims[i * n_texts
/// + t]` = similarity of image `i` and text `t`, e.g. logits from the GPU).
pub fn recall_from_similarity(
    sims: &[f32],
    n_images: usize,
    image_ids_of_texts: &[u64],
    image_ids_of_images: &[u64],
    ks: &[usize],
) -> Result<Recall> {
    check_ks(ks)?;
    let n_texts = image_ids_of_texts.len();
    ensure!(
        image_ids_of_images.len() == n_images,
        "recall: {n_images} images but {} image ids",
        image_ids_of_images.len()
    );
    ensure!(
        sims.len() == n_images * n_texts,
        "recall: similarity matrix has {} values, expected {n_images} x {n_texts}",
        sims.len()
    );
    let owner = text_owners(image_ids_of_texts, image_ids_of_images)?;
    let own: Vec<f64> = owner
        .iter()
        .enumerate()
        .map(|(t, &i)| sims[i * n_texts + t] as f64)
        .collect();
    let mut counter = RankCounter::new(&owner, n_images, own);
    let row_of = |i: usize| -> Vec<f64> {
        sims[i * n_texts..(i + 1) * n_texts]
            .iter()
            .map(|&s| s as f64)
            .collect()
    };
    count_ranks(&mut counter, n_images, &row_of)?;
    Ok(counter.finish(ks))
}

// ---------------------------------------------------------------------------
// Metrics log

/// One training log event. Keys follow the Trainer's `log_history`
/// (`loss`, `grad_norm`, `learning_rate`, `epoch`, `step`), plus
/// `images_per_s`.
#[derive(Clone, Debug, PartialEq)]
pub struct TrainRecord {
    pub step: u64,
    pub epoch: f64,
    /// Mean training loss since the previous log.
    pub loss: f64,
    pub learning_rate: f64,
    pub grad_norm: Option<f64>,
    pub images_per_s: Option<f64>,
}

/// An append-only JSON-lines file: one object per logging event, each written
/// with a single `write` and flushed, so a crash loses at most the line being
/// written (which [`MetricsLog::read`] then skips). Non-finite numbers are
/// written as `null`.
pub struct MetricsLog {
    path: PathBuf,
    file: std::fs::File,
}

fn num(x: f64) -> Value {
    // serde_json writes NaN/inf as null.
    Value::from(x)
}

impl MetricsLog {
    /// Open (creating it and its folder if needed) for appending. A last line
    /// cut short by a crash is ended first, so the next record starts on its
    /// own line.
    pub fn open(path: &Path) -> Result<MetricsLog> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .read(true)
            .open(path)
            .with_context(|| format!("opening {}", path.display()))?;
        let len = file.metadata()?.len();
        if len > 0 {
            let mut last = [0u8; 1];
            file.seek(SeekFrom::Start(len - 1))?;
            file.read_exact(&mut last)?;
            if last[0] != b'\n' {
                file.write_all(b"\n")?;
            }
        }
        Ok(MetricsLog {
            path: path.to_path_buf(),
            file,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Append one record, a JSON object (keys come out sorted, as
    /// serde_json's maps keep them).
    pub fn write(&mut self, record: &Value) -> Result<()> {
        ensure!(
            record.is_object(),
            "metrics log records are JSON objects, got {record}"
        );
        let mut line = serde_json::to_string(record)?;
        line.push('\n');
        self.append(&line)
    }

    fn append(&mut self, line: &str) -> Result<()> {
        self.file
            .write_all(line.as_bytes())
            .and_then(|_| self.file.flush())
            .with_context(|| format!("writing {}", self.path.display()))
    }

    /// Append one record: a JSON object with these keys in this order.
    pub fn write_pairs(&mut self, record: &[(&str, Value)]) -> Result<()> {
        let mut line = String::from("{");
        for (n, (k, v)) in record.iter().enumerate() {
            if n > 0 {
                line.push(',');
            }
            line.push_str(&serde_json::to_string(k)?);
            line.push(':');
            line.push_str(&serde_json::to_string(v)?);
        }
        line.push_str("}\n");
        self.append(&line)
    }

    /// Append a training event.
    pub fn train(&mut self, r: &TrainRecord) -> Result<()> {
        let mut m: Vec<(&str, Value)> = vec![("loss", num(r.loss))];
        if let Some(g) = r.grad_norm {
            m.push(("grad_norm", num(g)));
        }
        m.push(("learning_rate", num(r.learning_rate)));
        if let Some(x) = r.images_per_s {
            m.push(("images_per_s", num(x)));
        }
        m.push(("epoch", num(r.epoch)));
        m.push(("step", Value::from(r.step)));
        self.write_pairs(&m)
    }

    /// Append an evaluation event: `metrics` as given (e.g. `eval_loss`,
    /// `eval_i2t_recall@1`), then `epoch` and `step`.
    pub fn eval(&mut self, step: u64, epoch: f64, metrics: &[(String, f64)]) -> Result<()> {
        let mut m: Vec<(&str, Value)> =
            metrics.iter().map(|(k, v)| (k.as_str(), num(*v))).collect();
        m.push(("epoch", num(epoch)));
        m.push(("step", Value::from(step)));
        self.write_pairs(&m)
    }

    /// Every complete record of a log (a missing file reads as empty; lines
    /// that are not JSON objects, such as one cut short by a crash, are
    /// skipped).
    pub fn read(path: &Path) -> Result<Vec<Map<String, Value>>> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        Ok(text
            .lines()
            .filter_map(|l| match serde_json::from_str::<Value>(l) {
                Ok(Value::Object(m)) => Some(m),
                _ => None,
            })
            .collect())
    }

    /// Drop the records logged after optimizer step `step` (for a run resumed
    /// from that step's checkpoint, which logs those steps again). Rewrites
    /// the file atomically (torn lines go too); returns how many records were
    /// dropped. Call it before [`MetricsLog::open`].
    pub fn truncate_after(path: &Path, step: u64) -> Result<usize> {
        if !path.exists() {
            return Ok(0);
        }
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let mut out = String::new();
        let mut dropped = 0;
        for line in text.lines() {
            let rec = match serde_json::from_str::<Value>(line) {
                Ok(Value::Object(m)) => m,
                _ => continue,
            };
            if rec
                .get("step")
                .and_then(Value::as_u64)
                .is_none_or(|s| s <= step)
            {
                // Kept verbatim (key order and number spelling unchanged).
                out.push_str(line);
                out.push('\n');
            } else {
                dropped += 1;
            }
        }
        crate::model::weights::write_atomic(path, out.as_bytes())?;
        Ok(dropped)
    }
}

/// The series of the training chart, from log records (metrics.jsonl lines or
/// the Trainer's `log_history` entries): `(step, value)` points of the
/// training loss (`loss`), the evaluation loss (`eval_loss`) and the learning
/// rate (`learning_rate`). Null or missing values are skipped.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ChartData {
    pub train_loss: Vec<(f64, f64)>,
    pub eval_loss: Vec<(f64, f64)>,
    pub learning_rate: Vec<(f64, f64)>,
}

impl ChartData {
    /// The points of every record, in order.
    pub fn from_records<'a>(records: impl IntoIterator<Item = &'a Map<String, Value>>) -> Self {
        let mut d = Self::default();
        for r in records {
            d.push_record(r);
        }
        d
    }

    /// Add the points of one record (nothing when it has no `step`).
    pub fn push_record(&mut self, r: &Map<String, Value>) {
        let Some(step) = r.get("step").and_then(Value::as_f64) else {
            return;
        };
        for (key, series) in [
            ("loss", &mut self.train_loss),
            ("eval_loss", &mut self.eval_loss),
            ("learning_rate", &mut self.learning_rate),
        ] {
            if let Some(v) = r.get(key).and_then(Value::as_f64) {
                series.push((step, v));
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Training chart (plotters, drawn into an RGB buffer)

/// Chart size.
pub const CHART_WIDTH: u32 = 900;
pub const CHART_HEIGHT: u32 = 700;
/// Colour of the training loss curve (blue).
pub const TRAIN_COLOR: [u8; 3] = [31, 119, 180];
/// Colour of the evaluation loss points and line (orange).
pub const EVAL_COLOR: [u8; 3] = [230, 110, 0];
/// Colour of the learning-rate curve (green).
pub const LR_COLOR: [u8; 3] = [44, 160, 44];

/// Height of the loss panel; the learning-rate panel has the rest.
const LOSS_PANEL_HEIGHT: u32 = 450;
/// The family the chart's text asks for, served by the bundled font.
const FONT: &str = "sans-serif";

/// DejaVu Sans 2.37 (Debian's fonts-dejavu-core), compiled in so that the
/// chart needs no system fonts; licence: assets/fonts/LICENSE-DejaVuSans.txt.
static DEJAVU_SANS: &[u8] = include_bytes!("../../assets/fonts/DejaVuSans.ttf");

/// Register [`DEJAVU_SANS`] with plotters (once per process).
fn register_chart_font() -> Result<()> {
    static REGISTERED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let ok = *REGISTERED.get_or_init(|| {
        plotters::style::register_font(FONT, plotters::style::FontStyle::Normal, DEJAVU_SANS)
            .is_ok()
    });
    ensure!(ok, "the bundled chart font (DejaVu Sans) could not be read");
    Ok(())
}

/// Where one panel of the chart maps data to pixels.
#[derive(Clone, Debug, PartialEq)]
pub struct Panel {
    /// Data range shown on x (steps).
    pub x: std::ops::Range<f64>,
    /// Data range shown on y.
    pub y: std::ops::Range<f64>,
    /// Pixel of the `(x.start, y.start)` corner (bottom left).
    pub origin: (i32, i32),
    /// Pixel of the `(x.end, y.end)` corner (top right).
    pub corner: (i32, i32),
}

impl Panel {
    /// The pixel of data point `(x, y)`, rounded as plotters rounds.
    pub fn pixel(&self, x: f64, y: f64) -> (i32, i32) {
        let fx = (x - self.x.start) / (self.x.end - self.x.start);
        let fy = (y - self.y.start) / (self.y.end - self.y.start);
        // Pixel rows grow downwards: y counts up from the bottom row.
        (
            self.origin.0 + ((self.corner.0 - self.origin.0) as f64 * fx + 1e-3).floor() as i32,
            self.origin.1 + ((self.corner.1 - self.origin.1) as f64 * fy - 1e-3).ceil() as i32,
        )
    }

    /// Whether pixel `(px, py)` lies in the plotting area (frame included).
    pub fn contains(&self, px: i32, py: i32) -> bool {
        px >= self.origin.0 && px <= self.corner.0 && py >= self.corner.1 && py <= self.origin.1
    }
}

/// A drawn chart, with the panels' mappings (for tests and callers that
/// annotate it).
pub struct LossChart {
    pub image: RgbImage,
    /// Training and evaluation loss against step.
    pub loss: Panel,
    /// Learning rate against step.
    pub learning_rate: Panel,
}

/// The finite points of a series.
fn finite(points: &[(f64, f64)]) -> Vec<(f64, f64)> {
    points
        .iter()
        .filter(|p| p.0.is_finite() && p.1.is_finite())
        .copied()
        .collect()
}

/// Whether a series has points, all in one place (a line through them
/// would show nothing, so it is drawn as a dot).
fn one_place(points: &[(f64, f64)]) -> bool {
    points
        .first()
        .is_some_and(|p| points.iter().all(|q| q == p))
}

/// The x (step) range of every point: from 0 (or the least step, when
/// negative) to the last step, with 2% room either side (for the dots at
/// the ends); -0.02..1.02 without points.
fn step_range(points: &[(f64, f64)]) -> std::ops::Range<f64> {
    let lo = points.iter().map(|p| p.0).fold(0.0, f64::min);
    let hi = points.iter().map(|p| p.0).fold(f64::NEG_INFINITY, f64::max);
    let span = if hi > lo { hi - lo } else { 1.0 };
    lo - span * 0.02..lo + span * 1.02
}

/// The y range of the loss panel: the values with 5% margins; a flat series
/// gets +-10% (at least 0.1).
fn loss_range(points: &[(f64, f64)]) -> std::ops::Range<f64> {
    if points.is_empty() {
        return 0.0..1.0;
    }
    let lo = points.iter().map(|p| p.1).fold(f64::INFINITY, f64::min);
    let hi = points.iter().map(|p| p.1).fold(f64::NEG_INFINITY, f64::max);
    let pad = if hi - lo > 1e-12 * hi.abs().max(1.0) {
        (hi - lo) * 0.05
    } else {
        (lo.abs() * 0.1).max(0.1)
    };
    lo - pad..hi + pad
}

/// The y range of the learning-rate panel: from 0 (or the least rate, when
/// negative) to the largest rate, with 3% below and 5% above.
fn rate_range(points: &[(f64, f64)]) -> std::ops::Range<f64> {
    let lo = points.iter().map(|p| p.1).fold(0.0, f64::min);
    let hi = points.iter().map(|p| p.1).fold(0.0, f64::max);
    if hi - lo > 0.0 {
        lo - (hi - lo) * 0.03..hi + (hi - lo) * 0.05
    } else {
        -0.03..1.0
    }
}

/// Tick label of a step or a rate: scientific for small or large magnitudes
/// ("5e-5", "2.5e-4"), otherwise plain without trailing zeros ("500",
/// "0.25").
fn tick_label(v: &f64) -> String {
    let a = v.abs();
    if a < 1e-9 {
        "0".into()
    } else if (1e-2..1e7).contains(&a) {
        let s = format!("{v:.4}");
        s.trim_end_matches('0').trim_end_matches('.').into()
    } else {
        let s = format!("{v:.2e}");
        let (m, e) = s.split_once('e').unwrap_or((&s, "0"));
        let m = m.trim_end_matches('0').trim_end_matches('.');
        format!("{m}e{e}")
    }
}

/// The corner of the loss panel where the legend hides the fewest points of
/// `series` (their lines sampled between points too), upper right first.
fn legend_corner(
    series: &[&[(f64, f64)]],
    x: &std::ops::Range<f64>,
    y: &std::ops::Range<f64>,
) -> plotters::chart::SeriesLabelPosition {
    use plotters::chart::SeriesLabelPosition as P;
    // The legend covers about a quarter of the panel's width and height.
    let corners = [
        (P::UpperRight, true, true),
        (P::UpperLeft, false, true),
        (P::LowerRight, true, false),
        (P::LowerLeft, false, false),
    ];
    let mut hidden = [0usize; 4];
    for s in series {
        let samples = s.iter().copied().chain(s.windows(2).flat_map(|w| {
            (1..8).map(move |k| {
                let t = k as f64 / 8.0;
                (
                    w[0].0 + (w[1].0 - w[0].0) * t,
                    w[0].1 + (w[1].1 - w[0].1) * t,
                )
            })
        }));
        for (px, py) in samples {
            let fx = (px - x.start) / (x.end - x.start);
            let fy = (py - y.start) / (y.end - y.start);
            for (n, &(_, right, upper)) in corners.iter().enumerate() {
                let in_x = if right { fx > 0.7 } else { fx < 0.3 };
                let in_y = if upper { fy > 0.72 } else { fy < 0.28 };
                hidden[n] += (in_x && in_y) as usize;
            }
        }
    }
    let best = (0..4).min_by_key(|&n| hidden[n]).unwrap_or(0);
    corners[best].0.clone()
}

/// Draw the training chart ([`CHART_WIDTH`] x [`CHART_HEIGHT`]) with
/// plotters: an upper panel of loss against step, the training loss as a
/// line ([`TRAIN_COLOR`]) and the evaluation loss as dots joined by a thin
/// line ([`EVAL_COLOR`]), and a lower panel of the learning rate
/// ([`LR_COLOR`]) over the same steps; axes with tick labels and names, and
/// a legend of the three series in the loss panel's emptiest corner.
/// Non-finite points are left out; a series with all its points in one
/// place is drawn as a dot, and a chart without losses says so.
pub fn loss_chart(data: &ChartData) -> Result<LossChart> {
    use plotters::prelude::*;

    register_chart_font()?;
    let train = finite(&data.train_loss);
    let eval = finite(&data.eval_loss);
    let lr = finite(&data.learning_rate);
    let losses: Vec<(f64, f64)> = train.iter().chain(&eval).copied().collect();
    let all: Vec<(f64, f64)> = losses.iter().chain(&lr).copied().collect();
    let x = step_range(&all);
    let y_loss = loss_range(&losses);
    let y_lr = rate_range(&lr);

    let (w, h) = (CHART_WIDTH, CHART_HEIGHT);
    let mut buf = vec![255u8; (w * h * 3) as usize];
    let err = |e: &dyn std::fmt::Display| anyhow::anyhow!("drawing the loss chart: {e}");
    let (train_c, eval_c, lr_c) = (
        RGBColor(TRAIN_COLOR[0], TRAIN_COLOR[1], TRAIN_COLOR[2]),
        RGBColor(EVAL_COLOR[0], EVAL_COLOR[1], EVAL_COLOR[2]),
        RGBColor(LR_COLOR[0], LR_COLOR[1], LR_COLOR[2]),
    );
    let ink = RGBColor(40, 40, 40);
    let (grid, fine_grid) = (RGBColor(218, 218, 218), RGBColor(242, 242, 242));
    let text = |size: u32| (FONT, size).into_font().color(&ink);

    let (loss_panel, lr_panel) = {
        let root = BitMapBackend::with_buffer(&mut buf, (w, h)).into_drawing_area();
        let (top, bottom) = root.split_vertically(LOSS_PANEL_HEIGHT);

        // Loss against step.
        let mut chart = ChartBuilder::on(&top)
            .caption("loss and learning rate", text(22))
            .margin_left(12)
            .margin_right(28)
            .margin_top(8)
            .x_label_area_size(34)
            .y_label_area_size(70)
            .build_cartesian_2d(x.clone(), y_loss.clone())
            .map_err(|e| err(&e))?;
        chart
            .configure_mesh()
            .light_line_style(fine_grid)
            .bold_line_style(grid)
            .axis_style(ink)
            .label_style(text(15))
            .axis_desc_style(text(17))
            .y_desc("loss")
            .x_labels(8)
            .y_labels(7)
            .x_label_formatter(&tick_label)
            .draw()
            .map_err(|e| err(&e))?;
        if one_place(&train) {
            chart
                .draw_series(std::iter::once(Circle::new(train[0], 3, train_c.filled())))
                .map_err(|e| err(&e))?;
        }
        if !train.is_empty() {
            chart
                .draw_series(LineSeries::new(
                    train.iter().copied(),
                    train_c.stroke_width(2),
                ))
                .map_err(|e| err(&e))?
                .label("train loss")
                .legend(move |(x, y)| {
                    PathElement::new([(x, y), (x + 24, y)], train_c.stroke_width(2))
                });
        }
        if !eval.is_empty() {
            chart
                .draw_series(LineSeries::new(
                    eval.iter().copied(),
                    eval_c.stroke_width(1),
                ))
                .map_err(|e| err(&e))?;
            chart
                .draw_series(eval.iter().map(|&p| Circle::new(p, 4, eval_c.filled())))
                .map_err(|e| err(&e))?
                .label("eval loss")
                .legend(move |(x, y)| {
                    EmptyElement::at((x, y))
                        + PathElement::new([(0, 0), (24, 0)], eval_c.stroke_width(1))
                        + Circle::new((12, 0), 4, eval_c.filled())
                });
        }
        if !lr.is_empty() {
            // The rate's entry in this legend (its curve is in the panel
            // below).
            chart
                .draw_series(std::iter::empty::<PathElement<(f64, f64)>>())
                .map_err(|e| err(&e))?
                .label("learning rate (below)")
                .legend(move |(x, y)| {
                    PathElement::new([(x, y), (x + 24, y)], lr_c.stroke_width(2))
                });
        }
        if losses.is_empty() {
            let area = chart.plotting_area();
            let (xr, yr) = area.get_pixel_range();
            let msg = text(18).pos(plotters::style::text_anchor::Pos::new(
                plotters::style::text_anchor::HPos::Center,
                plotters::style::text_anchor::VPos::Center,
            ));
            top.draw_text(
                "(no loss logged yet)",
                &msg,
                ((xr.start + xr.end) / 2, (yr.start + yr.end) / 2),
            )
            .map_err(|e| err(&e))?;
        }
        if !all.is_empty() {
            chart
                .configure_series_labels()
                .position(legend_corner(&[&train, &eval], &x, &y_loss))
                .margin(12)
                .legend_area_size(34)
                .background_style(WHITE)
                .border_style(ink)
                .label_font(text(15))
                .draw()
                .map_err(|e| err(&e))?;
        }
        let loss_panel = Panel {
            x: x.clone(),
            y: y_loss.clone(),
            origin: chart.backend_coord(&(x.start, y_loss.start)),
            corner: chart.backend_coord(&(x.end, y_loss.end)),
        };

        // Learning rate against step.
        let mut chart = ChartBuilder::on(&bottom)
            .margin_left(12)
            .margin_right(28)
            .margin_top(10)
            .margin_bottom(6)
            .x_label_area_size(52)
            .y_label_area_size(70)
            .build_cartesian_2d(x.clone(), y_lr.clone())
            .map_err(|e| err(&e))?;
        chart
            .configure_mesh()
            .light_line_style(fine_grid)
            .bold_line_style(grid)
            .axis_style(ink)
            .label_style(text(15))
            .axis_desc_style(text(17))
            .y_desc("learning rate")
            .x_desc("step")
            .x_labels(8)
            .y_labels(6)
            .x_label_formatter(&tick_label)
            .y_label_formatter(&tick_label)
            .draw()
            .map_err(|e| err(&e))?;
        if one_place(&lr) {
            chart
                .draw_series(std::iter::once(Circle::new(lr[0], 3, lr_c.filled())))
                .map_err(|e| err(&e))?;
        }
        chart
            .draw_series(LineSeries::new(lr.iter().copied(), lr_c.stroke_width(2)))
            .map_err(|e| err(&e))?;
        let lr_panel = Panel {
            x: x.clone(),
            y: y_lr.clone(),
            origin: chart.backend_coord(&(x.start, y_lr.start)),
            corner: chart.backend_coord(&(x.end, y_lr.end)),
        };
        root.present().map_err(|e| err(&e))?;
        (loss_panel, lr_panel)
    };
    let image = RgbImage::from_raw(w, h, buf).context("chart buffer size")?;
    Ok(LossChart {
        image,
        loss: loss_panel,
        learning_rate: lr_panel,
    })
}

/// Write [`loss_chart`] as a PNG at `path`, atomically (a `.tmp` file
/// renamed over it), creating the folder if needed.
pub fn loss_curve_png(path: &Path, data: &ChartData) -> Result<()> {
    let chart = loss_chart(data)?;
    let mut bytes = Vec::new();
    chart
        .image
        .write_to(
            &mut std::io::Cursor::new(&mut bytes),
            image::ImageFormat::Png,
        )
        .context("encoding the loss chart")?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    crate::model::weights::write_atomic(path, &bytes)
}

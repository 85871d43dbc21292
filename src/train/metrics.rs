//! What a training run reports: image-text retrieval recall@K, a JSON-lines
//! metrics log, and a PNG chart of the loss.

use anyhow::{bail, ensure, Context, Result};
use image::{Rgb, RgbImage};
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

/// The points of a loss chart from log records: `(step, loss)` of training
/// events and `(step, eval_loss)` of evaluation events (null losses skipped).
#[allow(clippy::type_complexity)]
pub fn loss_points(records: &[Map<String, Value>]) -> (Vec<(f64, f64)>, Vec<(f64, f64)>) {
    let mut train = Vec::new();
    let mut eval = Vec::new();
    for r in records {
        let Some(step) = r.get("step").and_then(Value::as_f64) else {
            continue;
        };
        if let Some(l) = r.get("loss").and_then(Value::as_f64) {
            train.push((step, l));
        }
        if let Some(l) = r.get("eval_loss").and_then(Value::as_f64) {
            eval.push((step, l));
        }
    }
    (train, eval)
}

// ---------------------------------------------------------------------------
// Loss chart

/// Chart size.
pub const CHART_WIDTH: u32 = 800;
pub const CHART_HEIGHT: u32 = 500;
/// Colour of the training curve (blue).
pub const TRAIN_COLOR: [u8; 3] = [31, 119, 180];
/// Colour of the evaluation points (orange).
pub const EVAL_COLOR: [u8; 3] = [230, 110, 0];

const BG: Rgb<u8> = Rgb([255, 255, 255]);
const INK: Rgb<u8> = Rgb([40, 40, 40]);
const GRID: Rgb<u8> = Rgb([228, 228, 228]);

/// A 5x7 bitmap font: rows top to bottom, bit 4 the leftmost pixel.
fn glyph(c: char) -> [u8; 7] {
    match c {
        '0' => [0x0E, 0x11, 0x13, 0x15, 0x19, 0x11, 0x0E],
        '1' => [0x04, 0x0C, 0x04, 0x04, 0x04, 0x04, 0x0E],
        '2' => [0x0E, 0x11, 0x01, 0x02, 0x04, 0x08, 0x1F],
        '3' => [0x1F, 0x02, 0x04, 0x02, 0x01, 0x11, 0x0E],
        '4' => [0x02, 0x06, 0x0A, 0x12, 0x1F, 0x02, 0x02],
        '5' => [0x1F, 0x10, 0x1E, 0x01, 0x01, 0x11, 0x0E],
        '6' => [0x06, 0x08, 0x10, 0x1E, 0x11, 0x11, 0x0E],
        '7' => [0x1F, 0x01, 0x02, 0x04, 0x08, 0x08, 0x08],
        '8' => [0x0E, 0x11, 0x11, 0x0E, 0x11, 0x11, 0x0E],
        '9' => [0x0E, 0x11, 0x11, 0x0F, 0x01, 0x02, 0x0C],
        '.' => [0, 0, 0, 0, 0, 0x0C, 0x0C],
        '-' => [0, 0, 0, 0x1F, 0, 0, 0],
        '+' => [0, 0x04, 0x04, 0x1F, 0x04, 0x04, 0],
        ':' => [0, 0x0C, 0x0C, 0, 0x0C, 0x0C, 0],
        '(' => [0x02, 0x04, 0x08, 0x08, 0x08, 0x04, 0x02],
        ')' => [0x08, 0x04, 0x02, 0x02, 0x02, 0x04, 0x08],
        'a' => [0, 0, 0x0E, 0x01, 0x0F, 0x11, 0x0F],
        'b' => [0x10, 0x10, 0x16, 0x19, 0x11, 0x11, 0x1E],
        'c' => [0, 0, 0x0E, 0x10, 0x10, 0x11, 0x0E],
        'd' => [0x01, 0x01, 0x0D, 0x13, 0x11, 0x11, 0x0F],
        'e' => [0, 0, 0x0E, 0x11, 0x1F, 0x10, 0x0E],
        'f' => [0x06, 0x09, 0x08, 0x1C, 0x08, 0x08, 0x08],
        'g' => [0, 0, 0x0F, 0x11, 0x0F, 0x01, 0x0E],
        'h' => [0x10, 0x10, 0x16, 0x19, 0x11, 0x11, 0x11],
        'i' => [0x04, 0, 0x0C, 0x04, 0x04, 0x04, 0x0E],
        'k' => [0x10, 0x10, 0x12, 0x14, 0x18, 0x14, 0x12],
        'l' => [0x0C, 0x04, 0x04, 0x04, 0x04, 0x04, 0x0E],
        'm' => [0, 0, 0x1A, 0x15, 0x15, 0x11, 0x11],
        'n' => [0, 0, 0x16, 0x19, 0x11, 0x11, 0x11],
        'o' => [0, 0, 0x0E, 0x11, 0x11, 0x11, 0x0E],
        'p' => [0, 0, 0x1E, 0x11, 0x1E, 0x10, 0x10],
        'r' => [0, 0, 0x16, 0x19, 0x10, 0x10, 0x10],
        's' => [0, 0, 0x0E, 0x10, 0x0E, 0x01, 0x1E],
        't' => [0x08, 0x08, 0x1C, 0x08, 0x08, 0x09, 0x06],
        'u' => [0, 0, 0x11, 0x11, 0x11, 0x13, 0x0D],
        'v' => [0, 0, 0x11, 0x11, 0x11, 0x0A, 0x04],
        'w' => [0, 0, 0x11, 0x11, 0x15, 0x15, 0x0A],
        'x' => [0, 0, 0x11, 0x0A, 0x04, 0x0A, 0x11],
        'y' => [0, 0, 0x11, 0x11, 0x0F, 0x01, 0x0E],
        _ => [0; 7],
    }
}

fn text_width(s: &str, scale: u32) -> i64 {
    let n = s.chars().count() as i64;
    if n == 0 {
        0
    } else {
        (n * 6 - 1) * scale as i64
    }
}

fn put(img: &mut RgbImage, x: i64, y: i64, c: Rgb<u8>) {
    if x >= 0 && y >= 0 && (x as u32) < img.width() && (y as u32) < img.height() {
        img.put_pixel(x as u32, y as u32, c);
    }
}

fn draw_text(img: &mut RgbImage, s: &str, x: i64, y: i64, scale: u32, c: Rgb<u8>) {
    let sc = scale as i64;
    for (n, ch) in s.chars().enumerate() {
        let g = glyph(ch);
        let x0 = x + n as i64 * 6 * sc;
        for (row, bits) in g.iter().enumerate() {
            for col in 0..5 {
                if bits & (0x10 >> col) != 0 {
                    for dy in 0..sc {
                        for dx in 0..sc {
                            put(img, x0 + col * sc + dx, y + row as i64 * sc + dy, c);
                        }
                    }
                }
            }
        }
    }
}

fn fill_rect(img: &mut RgbImage, x0: i64, y0: i64, x1: i64, y1: i64, c: Rgb<u8>) {
    for y in y0..=y1 {
        for x in x0..=x1 {
            put(img, x, y, c);
        }
    }
}

/// A line `thick` pixels wide, only inside `clip` (x0, y0, x1, y1).
fn draw_line(
    img: &mut RgbImage,
    a: (i64, i64),
    b: (i64, i64),
    thick: i64,
    c: Rgb<u8>,
    clip: (i64, i64, i64, i64),
) {
    let (mut x, mut y) = a;
    let dx = (b.0 - a.0).abs();
    let dy = -(b.1 - a.1).abs();
    let sx = if a.0 < b.0 { 1 } else { -1 };
    let sy = if a.1 < b.1 { 1 } else { -1 };
    let mut err = dx + dy;
    let lo = -(thick - 1) / 2;
    let hi = thick / 2;
    loop {
        for oy in lo..=hi {
            for ox in lo..=hi {
                let (px, py) = (x + ox, y + oy);
                if px >= clip.0 && px <= clip.2 && py >= clip.1 && py <= clip.3 {
                    put(img, px, py, c);
                }
            }
        }
        if x == b.0 && y == b.1 {
            break;
        }
        let e2 = 2 * err;
        if e2 >= dy {
            err += dy;
            x += sx;
        }
        if e2 <= dx {
            err += dx;
            y += sy;
        }
    }
}

fn fill_circle(img: &mut RgbImage, cx: i64, cy: i64, r: i64, c: Rgb<u8>) {
    for y in -r..=r {
        for x in -r..=r {
            if x * x + y * y <= r * r + r {
                put(img, cx + x, cy + y, c);
            }
        }
    }
}

/// Tick positions for [lo, hi]: a 1-2-5 step giving about `target` ticks,
/// the range widened to whole steps, and the decimals its labels need.
fn nice_ticks(lo: f64, hi: f64, target: usize) -> (f64, f64, f64, usize) {
    let span = (hi - lo).max(1e-12);
    let raw = span / target.max(1) as f64;
    let mag = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * mag)
        .find(|s| *s >= raw * 0.999)
        .unwrap_or(10.0 * mag);
    let start = (lo / step + 1e-9).floor() * step;
    let end = (hi / step - 1e-9).ceil() * step;
    let decimals = (-step.log10() - 1e-9).ceil().max(0.0) as usize;
    (start, end.max(start + step), step, decimals)
}

fn fmt_tick(v: f64, decimals: usize) -> String {
    let s = format!("{v:.decimals$}");
    if s.starts_with('-') && s[1..].chars().all(|c| c == '0' || c == '.') {
        s[1..].to_string()
    } else {
        s
    }
}

/// Draw the loss chart ([`CHART_WIDTH`] x [`CHART_HEIGHT`]): training loss as
/// a line ([`TRAIN_COLOR`]), evaluation loss as dots joined by a thin line
/// ([`EVAL_COLOR`]), steps on x, loss on y, with tick labels, a legend and
/// the title "loss". Non-finite points are left out.
pub fn loss_curve_image(train: &[(f64, f64)], eval: &[(f64, f64)]) -> RgbImage {
    let (w, h) = (CHART_WIDTH as i64, CHART_HEIGHT as i64);
    let mut img = RgbImage::from_pixel(CHART_WIDTH, CHART_HEIGHT, BG);
    let finite = |p: &&(f64, f64)| p.0.is_finite() && p.1.is_finite();
    let train: Vec<(f64, f64)> = train.iter().filter(finite).copied().collect();
    let eval: Vec<(f64, f64)> = eval.iter().filter(finite).copied().collect();
    let all: Vec<(f64, f64)> = train.iter().chain(&eval).copied().collect();

    // Data ranges.
    let (mut x_lo, mut x_hi, mut y_lo, mut y_hi) = (0.0f64, 1.0f64, 0.0f64, 1.0f64);
    if !all.is_empty() {
        let xmin = all.iter().map(|p| p.0).fold(f64::INFINITY, f64::min);
        x_hi = all.iter().map(|p| p.0).fold(f64::NEG_INFINITY, f64::max);
        x_lo = if xmin >= 0.0 { 0.0 } else { xmin };
        if x_hi <= x_lo {
            x_hi = x_lo + 1.0;
        }
        y_lo = all.iter().map(|p| p.1).fold(f64::INFINITY, f64::min);
        y_hi = all.iter().map(|p| p.1).fold(f64::NEG_INFINITY, f64::max);
        let pad = if y_hi - y_lo > 1e-12 {
            (y_hi - y_lo) * 0.05
        } else {
            (y_lo.abs() * 0.1).max(0.1)
        };
        y_lo -= pad;
        y_hi += pad;
        if y_lo < 0.0 && all.iter().all(|p| p.1 >= 0.0) {
            y_lo = 0.0;
        }
    }
    let (xs, xe, xstep, xdec) = nice_ticks(x_lo, x_hi, 7);
    let (ys, ye, ystep, ydec) = nice_ticks(y_lo, y_hi, 6);

    // Plot area; the left margin fits the widest y label.
    let n_y = ((ye - ys) / ystep).round() as i64;
    let y_labels: Vec<String> = (0..=n_y)
        .map(|i| fmt_tick(ys + i as f64 * ystep, ydec))
        .collect();
    let label_w = y_labels.iter().map(|s| text_width(s, 2)).max().unwrap_or(0);
    let (left, right, top, bottom) = ((label_w + 22).max(56), w - 36, 54i64, h - 62);
    let px = |x: f64| left + ((x - xs) / (xe - xs) * (right - left) as f64).round() as i64;
    let py = |y: f64| bottom - ((y - ys) / (ye - ys) * (bottom - top) as f64).round() as i64;
    let clip = (left, top, right, bottom);

    // Grid, ticks and labels.
    for (i, label) in y_labels.iter().enumerate() {
        let y = py(ys + i as f64 * ystep);
        draw_line(&mut img, (left, y), (right, y), 1, GRID, (0, 0, w, h));
        draw_line(&mut img, (left - 5, y), (left, y), 1, INK, (0, 0, w, h));
        draw_text(
            &mut img,
            label,
            left - 9 - text_width(label, 2),
            y - 7,
            2,
            INK,
        );
    }
    let n_x = ((xe - xs) / xstep).round() as i64;
    for i in 0..=n_x {
        let v = xs + i as f64 * xstep;
        let x = px(v);
        draw_line(&mut img, (x, top), (x, bottom), 1, GRID, (0, 0, w, h));
        draw_line(&mut img, (x, bottom), (x, bottom + 5), 1, INK, (0, 0, w, h));
        let label = fmt_tick(v, xdec);
        draw_text(
            &mut img,
            &label,
            x - text_width(&label, 2) / 2,
            bottom + 10,
            2,
            INK,
        );
    }
    // Frame.
    for (a, b) in [
        ((left, top), (right, top)),
        ((left, bottom), (right, bottom)),
        ((left, top), (left, bottom)),
        ((right, top), (right, bottom)),
    ] {
        draw_line(&mut img, a, b, 1, INK, (0, 0, w, h));
    }
    // Title and axis name.
    draw_text(
        &mut img,
        "loss",
        (w - text_width("loss", 3)) / 2,
        14,
        3,
        INK,
    );
    draw_text(
        &mut img,
        "step",
        (left + right - text_width("step", 2)) / 2,
        h - 26,
        2,
        INK,
    );

    // Curves.
    let train_c = Rgb(TRAIN_COLOR);
    let eval_c = Rgb(EVAL_COLOR);
    let tp: Vec<(i64, i64)> = train.iter().map(|&(x, y)| (px(x), py(y))).collect();
    match tp.len() {
        0 => {}
        1 => fill_circle(&mut img, tp[0].0, tp[0].1, 3, train_c),
        _ => {
            for s in tp.windows(2) {
                draw_line(&mut img, s[0], s[1], 2, train_c, clip);
            }
        }
    }
    let ep: Vec<(i64, i64)> = eval.iter().map(|&(x, y)| (px(x), py(y))).collect();
    for s in ep.windows(2) {
        draw_line(&mut img, s[0], s[1], 1, eval_c, clip);
    }
    for &(x, y) in &ep {
        fill_circle(&mut img, x, y, 4, eval_c);
    }

    // Legend, top right inside the plot.
    let lx = right - 150;
    let mut ly = top + 12;
    if !tp.is_empty() {
        fill_rect(
            &mut img,
            lx - 8,
            ly - 6,
            right - 8,
            ly + 8 + if ep.is_empty() { 0 } else { 24 },
            BG,
        );
        draw_line(
            &mut img,
            (lx, ly + 1),
            (lx + 28, ly + 1),
            2,
            train_c,
            (0, 0, w, h),
        );
        draw_text(&mut img, "train", lx + 38, ly - 6, 2, INK);
        ly += 24;
    }
    if !ep.is_empty() {
        if tp.is_empty() {
            fill_rect(&mut img, lx - 8, ly - 6, right - 8, ly + 8, BG);
        }
        draw_line(
            &mut img,
            (lx, ly + 1),
            (lx + 28, ly + 1),
            1,
            eval_c,
            (0, 0, w, h),
        );
        fill_circle(&mut img, lx + 14, ly + 1, 4, eval_c);
        draw_text(&mut img, "eval", lx + 38, ly - 6, 2, INK);
    }
    if all.is_empty() {
        let msg = "(no data yet)";
        draw_text(
            &mut img,
            msg,
            (left + right - text_width(msg, 2)) / 2,
            (top + bottom) / 2 - 7,
            2,
            INK,
        );
    }
    img
}

/// Write [`loss_curve_image`] as a PNG at `path`, atomically (a `.tmp` file
/// renamed over it), creating the folder if needed.
pub fn loss_curve_png(path: &Path, train: &[(f64, f64)], eval: &[(f64, f64)]) -> Result<()> {
    let img = loss_curve_image(train, eval);
    let mut bytes = Vec::new();
    img.write_to(
        &mut std::io::Cursor::new(&mut bytes),
        image::ImageFormat::Png,
    )
    .context("encoding the loss chart")?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    crate::model::weights::write_atomic(path, &bytes)
}

//! Batches for the trainer: pictures decoded and preprocessed, captions
//! tokenized, on background threads while the GPU works on the previous
//! batch.
//!
//! Threads: `workers` decoders take the next positions of the order, load
//! and preprocess one picture each, and leave the result in a reorder
//! buffer; one assembler takes results strictly in order, fills batches,
//! tokenizes their captions and queues up to `prefetch` finished batches.
//! Because batches are filled in order, whatever the thread timing, the
//! batches are the same for any number of workers.
//!
//! A picture that cannot be read or decoded is skipped: the batch is filled
//! with the following examples (batches stay full), and the path and reason
//! are reported in [`LoadedBatch::skipped`] (and [`Loader::skipped`]). If
//! none of the first [`GIVE_UP_AFTER`] pictures loads, the loader stops with
//! an error rather than skip the whole dataset; so does a pass from the start
//! of the order that yields no batch at all (too few readable pictures for
//! one full batch with `drop_last`), which a training loop would otherwise
//! wait on forever.
//!
//! [`Loader::position`] counts the entries of the order used by the batches
//! returned so far; a loader created with `start` = that position yields the
//! same following batches (exact resume).

use crate::data::demo;
use crate::data::image::{load_image, preprocess, ImageProcessorConfig};
use crate::data::sources::{mix64, shuffle, Example, ImageSource};
use crate::data::text::TextTokenizer;
use anyhow::{bail, ensure, Result};
use image::DynamicImage;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

/// If this many pictures in a row fail before any loads, stop with an error.
pub const GIVE_UP_AFTER: usize = 32;

/// How batches are made.
#[derive(Clone, Debug, PartialEq)]
pub struct LoaderConfig {
    /// Examples per batch.
    pub batch_size: usize,
    /// Captions are padded / truncated to this many tokens.
    pub max_len: usize,
    /// Picture decoding threads (0 counts as 1).
    pub workers: usize,
    /// Finished batches kept ready ahead of the trainer (0 counts as 1).
    pub prefetch: usize,
    /// Drop a last batch smaller than `batch_size` (the HF Trainer's
    /// `dataloader_drop_last`, default false: it is kept).
    pub drop_last: bool,
    /// Fill a batch past an unreadable picture with the next examples
    /// (default). Off, each batch is exactly `batch_size` entries of the
    /// order and a skipped picture makes it smaller: data-parallel ranks
    /// read fixed slices of each global batch and must not drift into the
    /// next one.
    pub refill: bool,
}

impl Default for LoaderConfig {
    fn default() -> Self {
        LoaderConfig {
            batch_size: 32,
            max_len: 77,
            workers: std::thread::available_parallelism()
                .map(|n| n.get().min(8))
                .unwrap_or(2),
            prefetch: 2,
            drop_last: false,
            refill: true,
        }
    }
}

/// One batch, ready for upload.
#[derive(Clone, Debug, PartialEq)]
pub struct LoadedBatch {
    /// `pixel_values` [batch, 3, crop_h, crop_w], row-major.
    pub pixels: Vec<f32>,
    /// `input_ids` [batch, max_len].
    pub ids: Vec<u32>,
    /// `attention_mask` [batch, max_len]: 1.0 for tokens, 0.0 for padding.
    pub mask: Vec<f32>,
    /// Number of examples in this batch (`batch_size`, or fewer for the last).
    pub batch: usize,
    /// Each example's `image_id`.
    pub image_ids: Vec<u64>,
    /// Each example's index into the example list.
    pub positions: Vec<usize>,
    /// Pictures skipped while filling this batch: (path, reason).
    pub skipped: Vec<(PathBuf, String)>,
}

/// The order of examples in one epoch: a permutation of `0..n` that depends
/// only on (`n`, `seed`, `epoch`), the same on every platform (splitmix64 +
/// Fisher-Yates). Evaluation uses `(0..n).collect()` instead.
pub fn epoch_order(n: usize, seed: u64, epoch: u64) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    shuffle(&mut order, mix64(mix64(seed) ^ epoch));
    order
}

/// Side of the square a demo picture is rendered at: the size the processor
/// resizes to, so that its resize is the identity and the picture goes
/// through the same steps as a file would.
pub fn demo_render_size(p: &ImageProcessorConfig) -> u32 {
    let s = if p.do_resize {
        match p.resize_to {
            Some((h, w)) => h.max(w),
            None => p.shortest_edge,
        }
    } else {
        p.crop_h.max(p.crop_w)
    };
    s.max(1) as u32
}

/// Load and preprocess one example's picture.
pub fn load_pixels(
    image: &ImageSource,
    processor: &ImageProcessorConfig,
) -> std::result::Result<Vec<f32>, String> {
    let img = match image {
        ImageSource::File(path) => load_image(path).map_err(|e| format!("{e:#}"))?,
        ImageSource::Demo(seed) => {
            DynamicImage::ImageRgb8(demo::render(*seed, demo_render_size(processor)).0)
        }
        ImageSource::TarMember {
            shard,
            offset,
            member,
        } => crate::data::webdataset::load_member(shard, *offset, member)
            .and_then(|b| crate::data::image::decode_image(&b))
            .map_err(|e| format!("{e:#}"))?,
    };
    preprocess(&img, processor).map_err(|e| format!("{e:#}"))
}

enum Item {
    Ok(Vec<f32>),
    Bad(String),
}

struct State {
    /// Next position (index into `order`) a worker will take.
    next_claim: usize,
    /// Positions below this have been taken by the assembler.
    consumed: usize,
    results: BTreeMap<usize, Item>,
    shutdown: bool,
}

struct Shared {
    state: Mutex<State>,
    /// Workers wait here for room in the look-ahead window.
    room: Condvar,
    /// The assembler waits here for the next result.
    ready: Condvar,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

enum Msg {
    Batch(LoadedBatch, usize),
    End { position: usize },
    Err(anyhow::Error),
}

/// Batches of `examples` in `order`, made on background threads.
pub struct Loader {
    rx: Option<Receiver<Msg>>,
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
    position: usize,
    finished: bool,
    failed: bool,
    skipped: Vec<(PathBuf, String)>,
}

impl Loader {
    /// Start the threads. `order` lists indices into `examples` (e.g.
    /// [`epoch_order`]); batching begins at `order[start]`.
    pub fn new(
        examples: Arc<Vec<Example>>,
        order: Vec<usize>,
        start: usize,
        cfg: LoaderConfig,
        processor: ImageProcessorConfig,
        tokenizer: Arc<TextTokenizer>,
    ) -> Result<Loader> {
        ensure!(cfg.batch_size > 0, "batch size must be at least 1");
        ensure!(
            start <= order.len(),
            "resume position {start} is past the end of the order ({} examples)",
            order.len()
        );
        if let Some(&bad) = order.iter().find(|&&i| i >= examples.len()) {
            bail!(
                "the order refers to example {bad}, but there are only {}",
                examples.len()
            );
        }
        if !processor.do_center_crop && (!processor.do_resize || processor.resize_to.is_none()) {
            bail!(
                "batches need one picture size, but this image processor neither center-crops \
                 (do_center_crop) nor resizes to a fixed height and width"
            );
        }
        let (h, w) = processor.output_hw(1, 1);
        let pixel_len = 3 * h * w;
        let workers = cfg.workers.max(1);
        let window = cfg.batch_size + 2 * workers;
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                next_claim: start,
                consumed: start,
                results: BTreeMap::new(),
                shutdown: false,
            }),
            room: Condvar::new(),
            ready: Condvar::new(),
        });
        let order = Arc::new(order);
        let processor = Arc::new(processor);
        let mut threads = Vec::with_capacity(workers + 1);
        for k in 0..workers {
            let (shared, order, examples, processor) = (
                shared.clone(),
                order.clone(),
                examples.clone(),
                processor.clone(),
            );
            let t = std::thread::Builder::new()
                .name(format!("clip-loader-{k}"))
                .spawn(move || {
                    decode_worker(&shared, &order, &examples, &processor, window, pixel_len)
                })?;
            threads.push(t);
        }
        let (tx, rx) = sync_channel(cfg.prefetch.max(1));
        {
            let (shared, order, examples) = (shared.clone(), order.clone(), examples.clone());
            let t = std::thread::Builder::new()
                .name("clip-loader-batches".into())
                .spawn(move || {
                    assemble(
                        &shared, &order, &examples, start, &cfg, pixel_len, &tokenizer, &tx,
                    )
                })?;
            threads.push(t);
        }
        Ok(Loader {
            rx: Some(rx),
            shared,
            threads,
            position: start,
            finished: false,
            failed: false,
            skipped: Vec::new(),
        })
    }

    /// The next batch, or None when the order is used up.
    pub fn next_batch(&mut self) -> Result<Option<LoadedBatch>> {
        if self.finished {
            return Ok(None);
        }
        if self.failed {
            bail!("the data loader stopped after an earlier error");
        }
        let msg = self.rx.as_ref().and_then(|rx| rx.recv().ok());
        match msg {
            Some(Msg::Batch(b, end)) => {
                self.position = end;
                self.skipped.extend(b.skipped.iter().cloned());
                Ok(Some(b))
            }
            Some(Msg::End { position }) => {
                self.position = position;
                self.finished = true;
                Ok(None)
            }
            Some(Msg::Err(e)) => {
                self.failed = true;
                Err(e)
            }
            None => {
                self.failed = true;
                bail!("the data loader's batch thread stopped unexpectedly (a panic?)")
            }
        }
    }

    /// How many entries of the order the returned batches have used (plus
    /// `start`); pass it as `start` to continue exactly here.
    pub fn position(&self) -> usize {
        self.position
    }

    /// Every picture skipped in the batches returned so far.
    pub fn skipped(&self) -> &[(PathBuf, String)] {
        &self.skipped
    }
}

impl Iterator for Loader {
    type Item = Result<LoadedBatch>;
    fn next(&mut self) -> Option<Self::Item> {
        self.next_batch().transpose()
    }
}

impl Drop for Loader {
    fn drop(&mut self) {
        self.shared.lock().shutdown = true;
        self.shared.room.notify_all();
        self.shared.ready.notify_all();
        // Unblocks an assembler waiting to send.
        drop(self.rx.take());
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn decode_worker(
    shared: &Shared,
    order: &[usize],
    examples: &[Example],
    processor: &ImageProcessorConfig,
    window: usize,
    pixel_len: usize,
) {
    loop {
        let pos = {
            let mut st = shared.lock();
            loop {
                if st.shutdown || st.next_claim >= order.len() {
                    return;
                }
                if st.next_claim < st.consumed + window {
                    break;
                }
                st = shared.room.wait(st).unwrap_or_else(|e| e.into_inner());
            }
            st.next_claim += 1;
            st.next_claim - 1
        };
        let image = &examples[order[pos]].image;
        // A decoder panic on a hostile file is one bad picture, not a crash.
        let r = catch_quietly(|| load_pixels(image, processor));
        let item = match r {
            Ok(Ok(px)) if px.len() == pixel_len => Item::Ok(px),
            Ok(Ok(px)) => Item::Bad(format!(
                "preprocessed to {} values, expected {pixel_len}",
                px.len()
            )),
            Ok(Err(e)) => Item::Bad(e),
            Err(why) => Item::Bad(format!("the image decoder panicked on this file: {why}")),
        };
        shared.lock().results.insert(pos, item);
        shared.ready.notify_all();
    }
}

#[allow(clippy::too_many_arguments)]
fn assemble(
    shared: &Shared,
    order: &[usize],
    examples: &[Example],
    start: usize,
    cfg: &LoaderConfig,
    pixel_len: usize,
    tokenizer: &TextTokenizer,
    tx: &SyncSender<Msg>,
) {
    let mut pos = start;
    let mut loaded_any = false;
    let mut sent_any = false;
    let mut failures: Vec<(PathBuf, String)> = Vec::new();
    loop {
        let mut pixels = Vec::with_capacity(cfg.batch_size * pixel_len);
        let mut positions = Vec::with_capacity(cfg.batch_size);
        let mut skipped = Vec::new();
        let batch_start = pos;
        let filled = |positions: &Vec<usize>, pos: usize| {
            if cfg.refill {
                positions.len()
            } else {
                pos - batch_start
            }
        };
        while filled(&positions, pos) < cfg.batch_size && pos < order.len() {
            let item = {
                let mut st = shared.lock();
                loop {
                    if st.shutdown {
                        return;
                    }
                    if let Some(item) = st.results.remove(&pos) {
                        break item;
                    }
                    st = shared.ready.wait(st).unwrap_or_else(|e| e.into_inner());
                }
            };
            {
                let mut st = shared.lock();
                st.consumed = pos + 1;
            }
            shared.room.notify_all();
            let ex = &examples[order[pos]];
            match item {
                Item::Ok(px) => {
                    pixels.extend_from_slice(&px);
                    positions.push(order[pos]);
                    loaded_any = true;
                }
                Item::Bad(reason) => {
                    let path = ex.image.display_path();
                    if !loaded_any {
                        failures.push((path.clone(), reason.clone()));
                        if failures.len() >= GIVE_UP_AFTER {
                            let _ = tx.send(Msg::Err(none_loaded(&failures, start)));
                            return;
                        }
                    }
                    skipped.push((path, reason));
                }
            }
            pos += 1;
        }
        if !cfg.refill && positions.is_empty() && !skipped.is_empty() {
            let _ = tx.send(Msg::Err(anyhow::anyhow!(
                "every picture of a batch failed to load ({} of them; the first: {}: {})",
                skipped.len(),
                skipped[0].0.display(),
                skipped[0].1
            )));
            return;
        }
        if positions.is_empty() || (cfg.drop_last && positions.len() < cfg.batch_size) {
            let msg = if !loaded_any && !failures.is_empty() {
                Msg::Err(none_loaded(&failures, start))
            } else if !sent_any && start == 0 && !positions.is_empty() {
                // A whole pass with no batch: whoever loops over epochs
                // would wait forever for one.
                Msg::Err(no_full_batch(
                    positions.len(),
                    order.len(),
                    cfg.batch_size,
                    &skipped,
                ))
            } else {
                Msg::End { position: pos }
            };
            let _ = tx.send(msg);
            return;
        }
        let captions: Vec<&str> = positions
            .iter()
            .map(|&i| examples[i].caption.as_str())
            .collect();
        // A panic inside the tokenizer library is an error, not a dead thread.
        let encoded = catch_quietly(|| tokenizer.encode_batch(&captions, cfg.max_len))
            .unwrap_or_else(|why| Err(anyhow::anyhow!("the tokenizer panicked: {why}")));
        let (ids, mask) = match encoded {
            Ok(x) => x,
            Err(e) => {
                let _ = tx.send(Msg::Err(e.context("tokenizing a batch of captions")));
                return;
            }
        };
        let batch = LoadedBatch {
            pixels,
            ids,
            mask,
            batch: positions.len(),
            image_ids: positions.iter().map(|&i| examples[i].image_id).collect(),
            positions,
            skipped,
        };
        if tx.send(Msg::Batch(batch, pos)).is_err() {
            return;
        }
        sent_any = true;
    }
}

fn no_full_batch(
    loaded: usize,
    total: usize,
    batch_size: usize,
    skipped: &[(PathBuf, String)],
) -> anyhow::Error {
    let mut s = format!(
        "no batch of {batch_size} can be made: {loaded} of the {total} pictures could be loaded, \
         and drop_last (--dataloader_drop_last) drops the smaller last batch; lower the batch \
         size or leave out --dataloader_drop_last"
    );
    if !skipped.is_empty() {
        s.push_str(&format!("\n  {} picture(s) skipped:", skipped.len()));
        for (p, r) in skipped.iter().take(3) {
            s.push_str(&format!("\n  {}: {r}", p.display()));
        }
    }
    anyhow::anyhow!(s)
}

thread_local! {
    /// Set while [`catch_quietly`] runs on this thread.
    static QUIET: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Run `f`, turning a panic into `Err(message)` without the panic hook's
/// report on stderr: for third-party code (image decoders, `tokenizers`)
/// that panics on hostile input, whose failure the caller reports itself.
/// Panics on other threads are reported as usual.
pub fn catch_quietly<T>(f: impl FnOnce() -> T) -> std::result::Result<T, String> {
    static HOOK: std::sync::Once = std::sync::Once::new();
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !QUIET.with(|q| q.get()) {
                previous(info);
            }
        }));
    });
    let was = QUIET.with(|q| q.replace(true));
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
    QUIET.with(|q| q.set(was));
    r.map_err(|p| {
        p.downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| p.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "(no message)".into())
    })
}

fn none_loaded(failures: &[(PathBuf, String)], start: usize) -> anyhow::Error {
    let mut s = format!(
        "none of the {} pictures tried (from position {start} of the order) could be loaded; \
         is the data path right?",
        failures.len()
    );
    for (p, r) in failures.iter().take(3) {
        s.push_str(&format!("\n  {}: {r}", p.display()));
    }
    anyhow::anyhow!(s)
}

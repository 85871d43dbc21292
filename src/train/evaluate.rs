//! Evaluation: eval_loss and retrieval recall@K on the evaluation set,
//! across ranks as one process computes them.
//!
//! Each distinct picture is decoded and embedded once, and each caption
//! once (COCO val: 5,000 image forwards for 25,014 captions, not 25,014);
//! eval_loss is the contrastive loss of the same batches of examples as
//! before, from the cached image embeddings; recall@K ranks on the GPU
//! (a matmul and a top-k, [`crate::ops::topk`]).

use super::args::TrainArgs;
use super::batches::{loader, Batching};
use super::faults::{interrupted, Interrupted};
use super::metrics::recall_at_k_gpu;
use super::progress::log;
use super::setup::Setup;
use crate::data::loader::catch_quietly;
use crate::data::sources::Example;
use crate::data::TextTokenizer;
use crate::dist::{self, World};
use crate::ops::loss::clip_loss_forward;
use crate::tensor::Tensor;
use anyhow::{ensure, Result};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

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
///
/// The batches are those the Trainer's evaluation loop reads: the examples
/// in order, `per_device_eval_batch_size` at a time, an example whose
/// picture cannot be read left out (and reported) and the batch filled with
/// the next. Their image embeddings come from one pass over the distinct
/// pictures (an example's picture is its `image_id`'s), their text
/// embeddings from one pass over the captions in batches of similar length.
///
/// Across ranks each evaluates a contiguous shard of the examples and the
/// embeddings are gathered, so recall@K is over the whole set, as one
/// process computes it (the loss is per batch of a rank's shard).
pub fn evaluate(
    setup: &Setup,
    examples: &[Example],
    args: &TrainArgs,
    world: &World,
) -> Result<EvalResult> {
    let t0 = Instant::now();
    let model = &setup.model;
    let gpu = model.params.params[0].tensor.gpu().clone();
    let e = model.config.projection_dim;
    let ex = &examples[dist::shard(examples.len(), world.size(), world.rank())];
    let (pictures, picture_of) = distinct_pictures(ex);
    let picture_ids: Vec<u64> = pictures.iter().map(|x| x.image_id).collect();
    let batch = args.per_device_eval_batch_size.max(1);
    let (tok, max_len) = (&setup.tokenizer, setup.max_len);
    // The captions tokenized once (on another thread, while the pictures
    // are embedded): their lengths order the batches, their rows fill them.
    let (pictures_done, encoded) = std::thread::scope(|sc| {
        let encoded = sc.spawn(|| encode_all(tok, ex, max_len));
        let pictures = embed_pictures(setup, pictures, args, world);
        let encoded = encoded
            .join()
            .unwrap_or_else(|_| Err(anyhow::anyhow!("the tokenizer thread panicked")));
        (pictures, encoded)
    });
    let (picture_embeds, loaded) = pictures_done?;
    let (all_ids, all_mask) = encoded?;
    let lengths: Vec<usize> = all_mask
        .chunks(max_len)
        .map(|m| m.iter().filter(|&&v| v != 0.0).count())
        .collect();
    let pictures_s = t0.elapsed().as_secs_f64();
    // The examples whose picture loaded, in order: the batches' rows.
    let usable: Vec<usize> = (0..ex.len()).filter(|&i| loaded[picture_of[i]]).collect();
    // Each caption embedded once, in batches of captions of about the same
    // length: the text tower runs a batch up to its longest caption, and a
    // caption's embedding does not depend on the others in its batch (nor
    // on the padding after it: causal attention, masked keys).
    let mut by_length: Vec<usize> = (0..usable.len()).collect();
    by_length.sort_by_key(|&j| lengths[usable[j]]);
    let mut texts = vec![0.0f32; usable.len() * e];
    let mut run_before = 0;
    for rows in by_length.chunks(batch) {
        check_interrupt(world)?;
        // Rows cut to the batch's longest caption, so the tower runs exactly
        // its length (not the next multiple of 8 training rounds up to: a
        // quarter of the work for COCO's 12-token captions). The lengths
        // only grow, so a working set of the last length is not needed
        // again: the pool lets it go rather than keep one a length.
        let run = rows
            .iter()
            .map(|&j| lengths[usable[j]])
            .max()
            .unwrap_or(1)
            .max(1);
        if run != run_before {
            gpu.trim_pool();
            run_before = run;
        }
        let (mut ids, mut mask) = (Vec::with_capacity(rows.len() * run), Vec::new());
        for &j in rows {
            let r = usable[j] * max_len..usable[j] * max_len + run;
            ids.extend_from_slice(&all_ids[r.clone()]);
            mask.extend_from_slice(&all_mask[r]);
        }
        let txt = model.embed_texts(&ids, &mask, rows.len())?.to_vec()?;
        for (&j, row) in rows.iter().zip(txt.chunks(e)) {
            texts[j * e..(j + 1) * e].copy_from_slice(row);
        }
    }
    // eval_loss: the contrastive loss of each batch of examples, from their
    // cached embeddings.
    let scale = model.logit_scale_tensor();
    let (mut loss_sum, mut n) = (0.0f64, 0usize);
    let text_ids: Vec<u64> = usable.iter().map(|&i| ex[i].image_id).collect();
    for (b, rows) in usable.chunks(batch).enumerate() {
        check_interrupt(world)?;
        let mut img = Vec::with_capacity(rows.len() * e);
        for &i in rows {
            let p = picture_of[i];
            img.extend_from_slice(&picture_embeds[p * e..(p + 1) * e]);
        }
        let j0 = b * batch;
        let img = Tensor::from_slice(&gpu, &img, &[rows.len(), e])?;
        let txt = Tensor::from_slice(
            &gpu,
            &texts[j0 * e..(j0 + rows.len()) * e],
            &[rows.len(), e],
        )?;
        let (loss, _, _) = clip_loss_forward(&img, &txt, scale)?;
        loss_sum += loss.to_vec()?[0] as f64 * rows.len() as f64;
        n += rows.len();
    }
    // The pictures that loaded, in order of their first example.
    let mut images: Vec<f32> = Vec::new();
    let mut image_ids: Vec<u64> = Vec::new();
    for (p, ok) in loaded.iter().enumerate() {
        if *ok {
            images.extend_from_slice(&picture_embeds[p * e..(p + 1) * e]);
            image_ids.push(picture_ids[p]);
        }
    }
    let (images, image_ids, texts, text_ids, loss_sum, n) = if world.is_distributed() {
        gather_eval(world, e, images, image_ids, texts, text_ids, loss_sum, n)?
    } else {
        (images, image_ids, texts, text_ids, loss_sum, n)
    };
    ensure!(n > 0, "the evaluation set has no usable examples");
    let t1 = Instant::now();
    let r = recall_at_k_gpu(&gpu, &images, &texts, e, &text_ids, &image_ids, &[1, 5, 10])?;
    log(&format!(
        "evaluation: {} pictures embedded in {pictures_s:.1} s, {n} captions and the loss in {:.1} s, \
         recall ranked on the GPU in {:.1} s",
        image_ids.len(),
        t1.duration_since(t0).as_secs_f64() - pictures_s,
        t1.elapsed().as_secs_f64()
    ));
    Ok(EvalResult {
        loss: loss_sum / n as f64,
        recall: r.named(),
        samples: n,
        runtime_s: t0.elapsed().as_secs_f64(),
    })
}

/// Every example's caption tokenized ([examples, max_len] ids and mask,
/// padded to max_len as the batches take them).
fn encode_all(tok: &TextTokenizer, ex: &[Example], max_len: usize) -> Result<(Vec<u32>, Vec<f32>)> {
    let (mut ids, mut mask) = (Vec::with_capacity(ex.len() * max_len), Vec::new());
    for chunk in ex.chunks(1024) {
        let captions: Vec<&str> = chunk.iter().map(|x| x.caption.as_str()).collect();
        let (i, m) = catch_quietly(|| tok.encode_batch(&captions, max_len))
            .unwrap_or_else(|why| Err(anyhow::anyhow!("the tokenizer panicked: {why}")))?;
        ids.extend(i);
        mask.extend(m);
    }
    Ok((ids, mask))
}

/// Across ranks a stop is agreed at a step boundary instead: one rank
/// leaving the evaluation early would leave the others waiting.
fn check_interrupt(world: &World) -> Result<()> {
    if let Some(signal) = interrupted().filter(|_| !world.is_distributed()) {
        return Err(Interrupted {
            signal,
            message: "the evaluation was cut short".into(),
        }
        .into());
    }
    Ok(())
}

/// The distinct pictures of `ex` (by `image_id`), in order of first
/// appearance, each as its first example; and each example's picture.
fn distinct_pictures(ex: &[Example]) -> (Vec<Example>, Vec<usize>) {
    let mut index: HashMap<u64, usize> = HashMap::new();
    let mut pictures = Vec::new();
    let picture_of = ex
        .iter()
        .map(|x| {
            *index.entry(x.image_id).or_insert_with(|| {
                pictures.push(x.clone());
                pictures.len() - 1
            })
        })
        .collect();
    (pictures, picture_of)
}

/// Each picture's image embedding ([pictures, E] on the host; a picture
/// that could not be read has zeros and `false`), decoded on the loader's
/// threads and embedded `per_device_eval_batch_size` at a time.
fn embed_pictures(
    setup: &Setup,
    pictures: Vec<Example>,
    args: &TrainArgs,
    world: &World,
) -> Result<(Vec<f32>, Vec<bool>)> {
    let model = &setup.model;
    let gpu = model.params.params[0].tensor.gpu().clone();
    let (e, s) = (model.config.projection_dim, model.config.vision.image_size);
    let count = pictures.len();
    let mut out = vec![0.0f32; count * e];
    let mut loaded = vec![false; count];
    if count == 0 {
        return Ok((out, loaded));
    }
    let pictures = Arc::new(pictures);
    let mut ld = loader(
        setup,
        &pictures,
        (0..count).collect(),
        0,
        args,
        Batching {
            size: args.per_device_eval_batch_size,
            drop_last: false,
            refill: true,
        },
    )?;
    while let Some(b) = ld.next_batch()? {
        check_interrupt(world)?;
        for (p, why) in &b.skipped {
            log(&format!("skipped {}: {why}", p.display()));
        }
        let px = Tensor::from_slice(&gpu, &b.pixels, &[b.batch, 3, s, s])?;
        let emb = model.embed_images(&px)?.to_vec()?;
        for (row, &p) in emb.chunks(e).zip(&b.positions) {
            out[p * e..(p + 1) * e].copy_from_slice(row);
            loaded[p] = true;
        }
    }
    Ok((out, loaded))
}

type EvalParts = (Vec<f32>, Vec<u64>, Vec<f32>, Vec<u64>, f64, usize);

/// Every rank's evaluation embeddings ([rows, e], flat) and ids, in rank
/// order (the order of the examples), an image counted once over all
/// shards; the loss sums and example counts added up.
#[allow(clippy::too_many_arguments)]
fn gather_eval(
    world: &World,
    e: usize,
    images: Vec<f32>,
    image_ids: Vec<u64>,
    texts: Vec<f32>,
    text_ids: Vec<u64>,
    loss_sum: f64,
    n: usize,
) -> Result<EvalParts> {
    let img = world.all_gather_f32(&images);
    let txt = world.all_gather_f32(&texts);
    let iid = world.all_gather_bytes(bytemuck::cast_slice(&image_ids));
    let tid = world.all_gather_bytes(bytemuck::cast_slice(&text_ids));
    let sums = world.all_gather_bytes(bytemuck::cast_slice(&[loss_sum, n as f64]));
    let (mut images, mut image_ids, mut texts, mut text_ids) = (vec![], vec![], vec![], vec![]);
    let mut seen = std::collections::HashSet::new();
    for r in 0..world.size() {
        let ids: Vec<u64> = bytemuck::pod_collect_to_vec(&iid[r]);
        ensure!(
            img[r].len() == ids.len() * e,
            "rank {r} sent {} image values for {} images of {e}",
            img[r].len(),
            ids.len()
        );
        for (row, id) in img[r].chunks(e).zip(ids) {
            if seen.insert(id) {
                images.extend_from_slice(row);
                image_ids.push(id);
            }
        }
        texts.extend_from_slice(&txt[r]);
        text_ids.extend(bytemuck::pod_collect_to_vec::<u8, u64>(&tid[r]));
    }
    let (mut loss, mut count) = (0.0, 0usize);
    for b in &sums {
        let v: Vec<f64> = bytemuck::pod_collect_to_vec(b);
        loss += v[0];
        count += v[1] as usize;
    }
    Ok((images, image_ids, texts, text_ids, loss, count))
}

pub(super) fn eval_json(r: &EvalResult, epoch: f64, prefix: &str) -> Value {
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

pub(super) fn print_eval(label: &str, r: &EvalResult) {
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

/// The cached evaluation against the one it replaced (kept here as the
/// reference: every example's picture decoded and embedded with its
/// caption, the loss from the model's forward, recall by f64 dot products
/// on the CPU), on sets with several captions per picture in scattered
/// order and unreadable pictures.
#[cfg(test)]
mod tests {
    use super::super::batches::to_batch;
    use super::super::metrics::recall_at_k;
    use super::*;
    use crate::gpu::AdapterRequest;
    use crate::tape::Tape;
    use std::path::{Path, PathBuf};

    /// Today's evaluation before the caching, on one process.
    fn evaluate_per_example(
        setup: &Setup,
        examples: &[Example],
        args: &TrainArgs,
    ) -> Result<EvalResult> {
        let gpu = setup.model.params.params[0].tensor.gpu().clone();
        let ex = Arc::new(examples.to_vec());
        let mut ld = loader(
            setup,
            &ex,
            (0..ex.len()).collect(),
            0,
            args,
            Batching {
                size: args.per_device_eval_batch_size,
                drop_last: false,
                refill: true,
            },
        )?;
        let s = setup.model.config.vision.image_size;
        let (mut loss_sum, mut n) = (0.0f64, 0usize);
        let mut images: Vec<Vec<f32>> = Vec::new();
        let mut image_ids: Vec<u64> = Vec::new();
        let mut seen = std::collections::HashSet::new();
        let mut texts: Vec<Vec<f32>> = Vec::new();
        let mut text_ids: Vec<u64> = Vec::new();
        while let Some(b) = ld.next_batch()? {
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
                if seen.insert(b.image_ids[i]) {
                    images.push(img[i * e..(i + 1) * e].to_vec());
                    image_ids.push(b.image_ids[i]);
                }
            }
        }
        let r = recall_at_k(&images, &texts, &text_ids, &image_ids, &[1, 5, 10])?;
        Ok(EvalResult {
            loss: loss_sum / n as f64,
            recall: r.named(),
            samples: n,
            runtime_s: 0.0,
        })
    }

    fn gpu() -> Option<Arc<crate::Gpu>> {
        match crate::Gpu::new(&AdapterRequest::default().with_env().unwrap()) {
            Ok(g) => Some(g),
            Err(e) if !std::env::var("CI").is_ok_and(|v| v == "true" || v == "1") => {
                eprintln!("skipping GPU test: {e:#}");
                None
            }
            Err(e) => panic!("CI=true but no GPU adapter: {e:#}"),
        }
    }

    /// `pictures` small pictures (every `bad`-th one unreadable), each with
    /// 1 to 5 captions (some repeated across pictures), listed in a
    /// scattered order in `root/val.csv`.
    fn data(root: &Path, pictures: usize, bad: usize) -> PathBuf {
        std::fs::create_dir_all(root.join("imgs")).unwrap();
        let colours = ["red", "green", "blue", "yellow", "purple", "orange"];
        let mut rows = Vec::new();
        for i in 0..pictures {
            let path = root.join(format!("imgs/{i}.png"));
            if bad > 0 && i % bad == bad - 1 {
                std::fs::write(&path, b"not a picture").unwrap();
            } else {
                image::RgbImage::from_fn(40, 34, |x, y| {
                    image::Rgb([
                        (i * 37 % 256) as u8,
                        ((x as usize * 5 + i * 30) % 256) as u8,
                        ((y as usize * 7 + i * 11) % 256) as u8,
                    ])
                })
                .save(&path)
                .unwrap();
            }
            for c in 0..1 + (i * 7 + 3) % 5 {
                let caption = match c {
                    0 => format!("a {} picture", colours[i % 6]),
                    _ => format!("picture {i} caption {c} {}", colours[(i + c) % 6]),
                };
                rows.push(format!("imgs/{i}.png,{caption}"));
            }
        }
        // Scattered, as COCO's annotations are.
        let n = rows.len();
        let gcd = |mut a: usize, mut b: usize| {
            while b != 0 {
                (a, b) = (b, a % b);
            }
            a
        };
        let step = (17..).find(|&s| gcd(s, n) == 1).unwrap();
        let order: Vec<usize> = (0..n).map(|k| (k * step + 5) % n).collect();
        let mut csv = String::from("image_path,caption\n");
        for k in order {
            csv += &rows[k];
            csv.push('\n');
        }
        let f = root.join("val.csv");
        std::fs::write(&f, csv).unwrap();
        f
    }

    /// `model`: the model flags (a model folder, or a config to initialise).
    fn check(name: &str, model: &[String], pictures: usize, bad: usize, batch: usize) {
        let Some(gpu) = gpu() else { return };
        let root = std::env::temp_dir().join(format!(
            "clipwgpu-eval-cache-{name}-{batch}-{}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&root);
        let csv = data(&root, pictures, bad);
        let mut argv: Vec<String> = [
            "--validation_file",
            csv.to_str().unwrap(),
            "--output_dir",
            root.join("out").to_str().unwrap(),
            "--do_eval",
            "--max_seq_length",
            "16",
            "--per_device_eval_batch_size",
            &batch.to_string(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        argv.extend(model.iter().cloned());
        let (args, _) = super::super::args::parse(&argv).unwrap();
        let setup = super::super::setup::setup(&args, &gpu).unwrap();
        let now = evaluate(&setup, &setup.eval, &args, &World::single()).unwrap();
        let was = evaluate_per_example(&setup, &setup.eval, &args).unwrap();
        let what = format!("{name}, {pictures} pictures, batch {batch}");
        let rel = (now.loss - was.loss).abs() / was.loss.abs();
        eprintln!(
            "{what}: eval_loss {} cached, {} per example (relative {rel:.2e}); {} examples; {:?}",
            now.loss, was.loss, now.samples, now.recall
        );
        assert_eq!(now.samples, was.samples, "{what}: examples");
        assert!(rel < 1e-5, "{what}: eval_loss {} vs {}", now.loss, was.loss);
        assert_eq!(now.recall, was.recall, "{what}: recall");
        let _ = std::fs::remove_dir_all(&root);
    }

    fn fixture(p: &str) -> String {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join(p)
            .to_string_lossy()
            .into_owned()
    }

    #[test]
    fn cached_evaluation_equals_the_per_example_one() {
        // The transformers-made CLIP fixture (odd sizes: scalar kernels).
        let clip = [
            "--model_name_or_path".to_string(),
            fixture("tests/fixtures/clip/model"),
        ];
        check("clip", &clip, 23, 7, 4);
        check("clip", &clip, 23, 7, 7);
        check("clip", &clip, 9, 0, 64);
        // The demo's architecture, randomly initialised (the vec4 kernels).
        let tiny = [
            "--config_name".to_string(),
            fixture("assets/demo"),
            "--tokenizer_name".to_string(),
            fixture("assets/clip-tokenizer"),
        ];
        check("tiny", &tiny, 40, 9, 16);
        // CLIP vision + RoBERTa text.
        let Some(_) = gpu() else { return };
        let dual =
            std::env::temp_dir().join(format!("clipwgpu-eval-cache-dual-{}", std::process::id()));
        crate::model::prepare::prepare_dual_encoder(
            Path::new(&fixture("tests/fixtures/clip/model")),
            Path::new(&fixture("tests/fixtures/prepare/roberta_model")),
            &dual,
            None,
            3,
        )
        .unwrap();
        let dual_args = [
            "--model_name_or_path".to_string(),
            dual.to_string_lossy().into_owned(),
        ];
        check("dual", &dual_args, 12, 5, 5);
        let _ = std::fs::remove_dir_all(&dual);
    }
}

//! Evaluation: eval_loss and retrieval recall@K on the evaluation set,
//! across ranks as one process computes them.

use super::args::TrainArgs;
use super::batches::{loader, to_batch, Batching};
use super::faults::{interrupted, Interrupted};
use super::metrics::recall_at_k;
use super::progress::log;
use super::setup::Setup;
use crate::data::sources::Example;
use crate::dist::{self, World};
use crate::tape::Tape;
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
    let gpu = setup.model.params.params[0].tensor.gpu().clone();
    let mine = dist::shard(examples.len(), world.size(), world.rank());
    let ex = Arc::new(examples[mine].to_vec());
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
    let mut seen: HashMap<u64, ()> = HashMap::new();
    let mut texts: Vec<Vec<f32>> = Vec::new();
    let mut text_ids: Vec<u64> = Vec::new();
    while let Some(b) = ld.next_batch()? {
        // Across ranks a stop is agreed at a step boundary instead: one
        // rank leaving the evaluation early would leave the others waiting.
        if let Some(signal) = interrupted().filter(|_| !world.is_distributed()) {
            return Err(Interrupted {
                signal,
                message: "the evaluation was cut short".into(),
            }
            .into());
        }
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
    let (images, image_ids, texts, text_ids, loss_sum, n) = if world.is_distributed() {
        gather_eval(world, images, image_ids, texts, text_ids, loss_sum, n)?
    } else {
        (images, image_ids, texts, text_ids, loss_sum, n)
    };
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

type EvalParts = (Vec<Vec<f32>>, Vec<u64>, Vec<Vec<f32>>, Vec<u64>, f64, usize);

/// Every rank's evaluation embeddings and ids, in rank order (the order of
/// the examples), an image counted once over all shards; the loss sums and
/// example counts added up.
fn gather_eval(
    world: &World,
    images: Vec<Vec<f32>>,
    image_ids: Vec<u64>,
    texts: Vec<Vec<f32>>,
    text_ids: Vec<u64>,
    loss_sum: f64,
    n: usize,
) -> Result<EvalParts> {
    let flat = |v: &[Vec<f32>]| v.concat();
    let e = texts.first().or(images.first()).map_or(0, Vec::len);
    let dims = world.all_gather_bytes(&(e as u64).to_le_bytes());
    let e = dims
        .iter()
        .map(|b| u64::from_le_bytes(b[..8].try_into().unwrap()) as usize)
        .max()
        .unwrap_or(0);
    let img = world.all_gather_f32(&flat(&images));
    let txt = world.all_gather_f32(&flat(&texts));
    let iid = world.all_gather_bytes(bytemuck::cast_slice(&image_ids));
    let tid = world.all_gather_bytes(bytemuck::cast_slice(&text_ids));
    let sums = world.all_gather_bytes(bytemuck::cast_slice(&[loss_sum, n as f64]));
    let rows = |v: &[f32]| -> Vec<Vec<f32>> { v.chunks(e.max(1)).map(<[f32]>::to_vec).collect() };
    let (mut images, mut image_ids, mut texts, mut text_ids) = (vec![], vec![], vec![], vec![]);
    let mut seen = std::collections::HashSet::new();
    for r in 0..world.size() {
        let ids: Vec<u64> = bytemuck::pod_collect_to_vec(&iid[r]);
        for (row, id) in rows(&img[r]).into_iter().zip(ids) {
            if seen.insert(id) {
                images.push(row);
                image_ids.push(id);
            }
        }
        texts.extend(rows(&txt[r]));
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

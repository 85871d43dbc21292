//! One optimizer step's gradients from a group of micro-batches.
//!
//! A contrastive loss is not a sum over examples: every other caption of
//! the batch is a negative. So K micro-batches of B accumulated the way the
//! Hugging Face Trainer does (a loss per micro-batch, gradients summed) is
//! not a batch of K x B. [`AccumulationLoss::Full`] (the default) computes
//! the gradient of the whole group's loss exactly, by gradient caching (Gao
//! et al. 2021, "Scaling Deep Contrastive Learning Batch Size under Memory
//! Limited Setup"):
//! 1. each micro-batch forward without a tape, keeping only its L2-normalised
//!    embeddings (the rows of an [N, E] matrix per tower);
//! 2. the symmetric contrastive loss over all N x N pairs, and its gradient
//!    with respect to the embeddings and logit_scale, once (in blocks of
//!    text rows above 1,024 pairs, so the N x N logits are never whole);
//! 3. each micro-batch forward again with the tape, its backward seeded with
//!    its rows of the embedding gradient; parameter gradients accumulate.
//!
//! Step 3 recomputes exactly what step 1 computed (no dropout here, and the
//! kernels are deterministic), so the result is the gradient of one batch of
//! N, at the cost of one more forward per micro-batch. A frozen tower's
//! pooled output is kept from step 1 instead of being recomputed (only its
//! projection trains). [`AccumulationLoss::Micro`] keeps the Trainer's
//! meaning: the mean of the micro-batches' own losses.

use crate::dist::World;
use crate::model::clip::{Batch, ClipModel};
use crate::ops::loss::contrastive_loss;
use crate::ops::loss_local::row_ce;
use crate::tape::{Grads, Tape, Var};
use crate::tensor::Tensor;
use anyhow::{bail, Context, Result};

/// What a loss over an accumulation group means.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AccumulationLoss {
    /// One contrastive loss over all the group's pairs (gradient caching).
    Full,
    /// The mean of each micro-batch's own loss (the Trainer's meaning).
    Micro,
}

impl AccumulationLoss {
    pub fn parse(s: &str) -> Result<AccumulationLoss> {
        match s.to_ascii_lowercase().as_str() {
            "full" => Ok(AccumulationLoss::Full),
            "micro" => Ok(AccumulationLoss::Micro),
            _ => bail!("{s:?} is not an accumulation loss: expected full or micro"),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            AccumulationLoss::Full => "full",
            AccumulationLoss::Micro => "micro",
        }
    }
}

/// The gradients of one optimizer step and the loss they are of.
pub struct GroupGrads {
    /// In store order; `None` for frozen parameters.
    pub grads: Vec<Option<Tensor>>,
    /// Loss scalars on the GPU (read after the step's one wait): the step's
    /// loss is their sum times `loss_weight`.
    pub losses: Vec<Tensor>,
    pub loss_weight: f64,
}

/// Where a full-batch group's micro-batches come from. Pass 1 pulls them
/// one at a time (so a source may stream them from a loader, not hold the
/// whole group); pass 2 asks for each again, in order.
pub trait MicroBatches {
    /// The group's next micro-batch (pass 1); `None` after its last.
    fn next(&mut self) -> Result<Option<Batch>>;
    /// Micro-batch `i` again (pass 2; `i` = 0, 1, ... in order).
    fn again(&mut self, i: usize) -> Result<Batch>;
}

/// A group whose `count` micro-batches `batch(i)` makes at will.
struct InHand<F> {
    count: usize,
    next: usize,
    batch: F,
}

impl<F: FnMut(usize) -> Result<Batch>> MicroBatches for InHand<F> {
    fn next(&mut self) -> Result<Option<Batch>> {
        if self.next == self.count {
            return Ok(None);
        }
        self.next += 1;
        (self.batch)(self.next - 1).map(Some)
    }
    fn again(&mut self, i: usize) -> Result<Batch> {
        (self.batch)(i)
    }
}

/// Gradients of a group of `count` micro-batches; `batch(i)` gives
/// micro-batch `i` (called twice per micro-batch in `Full` mode, so pixels
/// need not stay on the GPU between the passes). A group of one is an
/// ordinary step in either mode. A shorter group (the end of an epoch) is
/// weighted by its real size: `Full` is the loss over its rows; `Micro`
/// divides by the micro-batches it has, as recent Trainers do.
///
/// With several ranks in `world`, each micro-batch is this rank's part of a
/// global one: the embeddings are gathered from every rank, so each loss
/// is over the global rows (`Full`: the whole global group; `Micro`: each
/// global micro-batch), and the gradients returned are this rank's share,
/// to be summed over ranks.
pub fn group_grads(
    model: &ClipModel,
    mode: AccumulationLoss,
    count: usize,
    batch: impl FnMut(usize) -> Result<Batch>,
    world: &World,
) -> Result<GroupGrads> {
    group_grads_scaled(model, mode, count, batch, world, 1.0)
}

/// [`group_grads`] with every backward seed multiplied by `loss_scale`
/// (fp16's loss scaling: the gradients come back that many times larger;
/// the losses are unscaled). A power of two keeps the scaling exact.
pub fn group_grads_scaled(
    model: &ClipModel,
    mode: AccumulationLoss,
    count: usize,
    mut batch: impl FnMut(usize) -> Result<Batch>,
    world: &World,
    loss_scale: f32,
) -> Result<GroupGrads> {
    if count == 0 {
        bail!("an accumulation group needs at least one micro-batch");
    }
    if !world.is_distributed() && (mode == AccumulationLoss::Micro || count == 1) {
        return micro_losses(model, count, &mut batch, loss_scale);
    }
    if count == 1 {
        let acc = vec![None; model.params.params.len()];
        let (grads, loss) = gathered_batch_grads(model, &batch(0)?, world, loss_scale, acc)?;
        return Ok(GroupGrads {
            grads,
            losses: vec![loss],
            loss_weight: 1.0,
        });
    }
    if mode == AccumulationLoss::Full {
        let mut src = InHand {
            count,
            next: 0,
            batch,
        };
        return full_batch_grads_scaled(model, &mut src, world, loss_scale);
    }
    // Micro mode across ranks: one gathered loss per global micro-batch.
    let mut acc = vec![None; model.params.params.len()];
    let mut losses = Vec::with_capacity(count);
    let weight = 1.0 / count as f32 * loss_scale;
    for i in 0..count {
        let (a, loss) = gathered_batch_grads(model, &batch(i)?, world, weight, acc)?;
        acc = a;
        losses.push(loss);
        model.params.params[0].tensor.gpu().flush_paced()?;
    }
    Ok(GroupGrads {
        grads: acc,
        losses,
        loss_weight: 1.0 / count as f64,
    })
}

fn micro_losses(
    model: &ClipModel,
    count: usize,
    batch: &mut impl FnMut(usize) -> Result<Batch>,
    loss_scale: f32,
) -> Result<GroupGrads> {
    let gpu = model.params.params[0].tensor.gpu().clone();
    let mut acc = vec![None; model.params.params.len()];
    let mut losses = Vec::with_capacity(count);
    for i in 0..count {
        let b = batch(i)?;
        let mut tape = model.tape();
        let p = model.params.vars(&mut tape);
        let out = model.forward(&mut tape, &p, &b)?;
        let seed = Tensor::scalar(&gpu, 1.0 / count as f32 * loss_scale)?;
        let into = model.params.pending(&p, acc);
        let mut g = tape.backward_seeded(vec![(&out.loss, seed)], into)?;
        acc = model.params.grads(&p, &mut g);
        losses.push(out.loss.into_tensor());
        if count > 1 {
            gpu.flush_paced()?;
        }
    }
    Ok(GroupGrads {
        grads: acc,
        losses,
        loss_weight: 1.0 / count as f64,
    })
}

/// `Full` mode's gradients for the micro-batches `src` gives (at least
/// one; see the module doc), the loss over every rank's rows of them.
pub fn full_batch_grads(
    model: &ClipModel,
    src: &mut dyn MicroBatches,
    world: &World,
) -> Result<GroupGrads> {
    full_batch_grads_scaled(model, src, world, 1.0)
}

/// [`full_batch_grads`] with the backward seeded `loss_scale` times larger
/// (as [`group_grads_scaled`]).
pub fn full_batch_grads_scaled(
    model: &ClipModel,
    src: &mut dyn MicroBatches,
    world: &World,
    loss_scale: f32,
) -> Result<GroupGrads> {
    let acc = vec![None; model.params.params.len()];
    let (grads, loss) = cached_grads(model, src, world, loss_scale, acc)?;
    Ok(GroupGrads {
        grads,
        losses: vec![loss],
        loss_weight: 1.0,
    })
}

/// Gradient caching over `src`'s micro-batches (and, across ranks, every
/// rank's): `weight` times the gradient of one contrastive loss over all
/// their pairs, added into `acc`. Returns the gradients and the loss.
fn cached_grads(
    model: &ClipModel,
    src: &mut dyn MicroBatches,
    world: &World,
    weight: f32,
    mut acc: Vec<Option<Tensor>>,
) -> Result<(Vec<Option<Tensor>>, Tensor)> {
    let gpu = model.params.params[0].tensor.gpu().clone();
    let keep_image = model.tower_frozen("vision_model.");
    let keep_text = model.tower_frozen("text_model.");
    // Pass 1: embeddings only, nothing recorded. A frozen tower's pooled
    // output is kept for pass 2.
    let (mut image_parts, mut text_parts) = (Vec::new(), Vec::new());
    let (mut image_pooled, mut text_pooled) = (Vec::new(), Vec::new());
    while let Some(b) = src.next()? {
        b.check()?;
        let mut tape = model.no_grad_tape();
        let p = model.params.vars(&mut tape);
        let pi = model.image_pooled(&mut tape, &p, &b.pixels)?;
        image_parts.push(model.image_embeds(&mut tape, &p, &pi)?.into_tensor());
        image_pooled.push(keep_image.then(|| pi.into_tensor()));
        let pt = model.text_pooled(&mut tape, &p, &b.ids, &b.mask, b.batch)?;
        text_parts.push(model.text_embeds(&mut tape, &p, &pt)?.into_tensor());
        text_pooled.push(keep_text.then(|| pt.into_tensor()));
        gpu.flush_paced()?;
    }
    if image_parts.is_empty() {
        bail!("an accumulation group needs at least one micro-batch");
    }
    let (image, text) = (concat_rows(image_parts)?, concat_rows(text_parts)?);
    let global = global_loss(model, world, image, text, weight, &mut acc)?;
    // Pass 2: each micro-batch again with the tape, seeded with its rows.
    let mut row = global.row;
    for (i, (img, txt)) in image_pooled.into_iter().zip(text_pooled).enumerate() {
        let b = src.again(i)?;
        b.check()?;
        let mut tape = model.tape();
        let p = model.params.vars(&mut tape);
        let pi = match img {
            Some(t) => Var::constant(t),
            None => model.image_pooled(&mut tape, &p, &b.pixels)?,
        };
        let ie = model.image_embeds(&mut tape, &p, &pi)?;
        let pt = match txt {
            Some(t) => Var::constant(t),
            None => model.text_pooled(&mut tape, &p, &b.ids, &b.mask, b.batch)?,
        };
        let te = model.text_embeds(&mut tape, &p, &pt)?;
        let seeds = vec![
            (&ie, global.d_image.rows_copy(row, b.batch)?),
            (&te, global.d_text.rows_copy(row, b.batch)?),
        ];
        let into = model.params.pending(&p, acc);
        let mut g = tape.backward_seeded(seeds, into)?;
        acc = model.params.grads(&p, &mut g);
        row += b.batch;
        gpu.flush_paced()?;
    }
    Ok((acc, global.loss))
}

/// One batch whose loss is over every rank's rows: a single forward with
/// the tape, the embeddings gathered, and the backward seeded with this
/// rank's rows of the loss's gradient (no second forward, as there is
/// nothing to free between the passes). `weight` and `acc` as in
/// [`cached_grads`].
fn gathered_batch_grads(
    model: &ClipModel,
    b: &Batch,
    world: &World,
    weight: f32,
    mut acc: Vec<Option<Tensor>>,
) -> Result<(Vec<Option<Tensor>>, Tensor)> {
    b.check()?;
    let mut tape = model.tape();
    let p = model.params.vars(&mut tape);
    let pi = model.image_pooled(&mut tape, &p, &b.pixels)?;
    let ie = model.image_embeds(&mut tape, &p, &pi)?;
    let pt = model.text_pooled(&mut tape, &p, &b.ids, &b.mask, b.batch)?;
    let te = model.text_embeds(&mut tape, &p, &pt)?;
    let (image, text) = (ie.tensor().clone(), te.tensor().clone());
    let global = global_loss(model, world, image, text, weight, &mut acc)?;
    let seeds = vec![
        (&ie, global.d_image.rows_copy(global.row, b.batch)?),
        (&te, global.d_text.rows_copy(global.row, b.batch)?),
    ];
    let into = model.params.pending(&p, acc);
    let mut g = tape.backward_seeded(seeds, into)?;
    Ok((model.params.grads(&p, &mut g), global.loss))
}

/// logit_scale and its variable on `tape` (a constant when frozen).
fn scale_var<'m>(model: &'m ClipModel, tape: &mut Tape) -> (&'m crate::model::params::Param, Var) {
    let ls = &model.params.params[model.logit_scale];
    let sv = if ls.trainable {
        tape.param(ls.tensor.clone())
    } else {
        Var::constant(ls.tensor.clone())
    };
    (ls, sv)
}

/// The contrastive loss over every rank's rows and its gradient for them.
struct GlobalLoss {
    loss: Tensor,
    d_image: Tensor,
    d_text: Tensor,
    /// Where this rank's rows begin in `d_image` and `d_text`.
    row: usize,
}

/// Gather this rank's embeddings [n, E] from every rank, compute the loss
/// over all pairs and, scaled by `weight`, its gradient for the embeddings
/// and logit_scale (added into `acc`; every rank gets the whole of both).
fn global_loss(
    model: &ClipModel,
    world: &World,
    image: Tensor,
    text: Tensor,
    weight: f32,
    acc: &mut [Option<Tensor>],
) -> Result<GlobalLoss> {
    if world.local_loss() {
        return local_loss(model, world, image, text, weight, acc);
    }
    let (all_i, all_t, row) = world.all_gather_pair(image, text)?;
    let mut tape = model.tape();
    let (iv, tv) = (tape.param(all_i), tape.param(all_t));
    let (ls, sv) = scale_var(model, &mut tape);
    let loss = contrastive_loss(&mut tape, &iv, &tv, &sv)?;
    let mut into = Grads::default();
    if let Some(held) = acc[model.logit_scale].take() {
        into.insert(&sv, held);
    }
    let seed = Tensor::scalar(ls.tensor.gpu(), weight)?.reshape(loss.tensor().shape())?;
    let mut g = tape.backward_seeded(vec![(&loss, seed)], into)?;
    let d_image = g
        .take(&iv)
        .context("no gradient for the image embeddings")?;
    let d_text = g.take(&tv).context("no gradient for the text embeddings")?;
    acc[model.logit_scale] = g.take(&sv);
    Ok(GlobalLoss {
        loss: loss.into_tensor(),
        d_image,
        d_text,
        row,
    })
}

/// [`global_loss`] as OpenCLIP's local loss: this rank's rows against all
/// gathered columns (ops::loss_local), n x N instead of N x N. The
/// gradients that reach the gathered columns, logit_scale's and the loss are
/// summed over ranks (one all-reduce: what a gather with gradient does), so
/// the result is the same as the whole loss's. Returns this rank's rows
/// only (`row` 0).
fn local_loss(
    model: &ClipModel,
    world: &World,
    image: Tensor,
    text: Tensor,
    weight: f32,
    acc: &mut [Option<Tensor>],
) -> Result<GlobalLoss> {
    let gpu = image.gpu().clone();
    let (n, e) = (image.rows(), image.cols());
    let (all_i, all_t, row) = world.all_gather_pair(image.clone(), text.clone())?;
    let total = all_i.rows();
    let mut tape = model.tape();
    let (il, tl) = (tape.param(image), tape.param(text));
    let (ia, ta) = (tape.param(all_i), tape.param(all_t));
    let (ls, sv) = scale_var(model, &mut tape);
    let denom = 2.0 * total as f32;
    let li = row_ce(&mut tape, &il, &ta, &sv, row, denom)?;
    let lt = row_ce(&mut tape, &tl, &ia, &sv, row, denom)?;
    let seed = || Tensor::scalar(&gpu, weight);
    let mut g = tape.backward_seeded(vec![(&li, seed()?), (&lt, seed()?)], Grads::default())?;
    let take = |g: &mut Grads, v: &Var, what: &str| {
        g.take(v)
            .with_context(|| format!("no gradient for the {what} embeddings"))
    };
    let (d_il, d_tl) = (take(&mut g, &il, "image")?, take(&mut g, &tl, "text")?);
    let (d_ia, d_ta) = (take(&mut g, &ia, "image")?, take(&mut g, &ta, "text")?);
    // One readback of [d columns of I | d columns of T | d logit_scale |
    // the loss's halves], summed over ranks, then [d own rows of I | of T |
    // logit_scale's gradient held so far], this rank's alone.
    let ds = g.take(&sv);
    let held = if ds.is_some() {
        acc[model.logit_scale].take()
    } else {
        None
    };
    let (cols, own) = (total * e, n * e);
    let summed = 2 * cols + 3;
    let staging = Tensor::zeros(&gpu, &[summed + 2 * own + 1])?;
    let put = |t: Option<&Tensor>, at: usize, len: usize| {
        if let Some(t) = t {
            gpu.copy_at(
                t.buffer(),
                0,
                staging.buffer(),
                (at * 4) as u64,
                (len * 4) as u64,
            );
        }
    };
    put(Some(&d_ia), 0, cols);
    put(Some(&d_ta), cols, cols);
    put(ds.as_ref(), 2 * cols, 1);
    put(Some(li.tensor()), 2 * cols + 1, 1);
    put(Some(lt.tensor()), 2 * cols + 2, 1);
    put(Some(&d_il), summed, own);
    put(Some(&d_tl), summed + own, own);
    put(held.as_ref(), summed + 2 * own, 1);
    let mut host = staging.to_vec()?;
    world.all_reduce_sum(&mut host[..summed]);
    // This rank's rows: their gradient as rows plus what every rank's loss
    // sent them as columns.
    let mine = |cols_at: usize, own_at: usize| -> Result<Tensor> {
        let from_cols = &host[cols_at + row * e..cols_at + (row + n) * e];
        let sum: Vec<f32> = host[own_at..own_at + own]
            .iter()
            .zip(from_cols)
            .map(|(a, b)| a + b)
            .collect();
        Tensor::from_slice(&gpu, &sum, &[n, e])
    };
    let d_image = mine(0, summed)?;
    let d_text = mine(cols, summed + own)?;
    let loss = host[2 * cols + 1] + host[2 * cols + 2];
    if ds.is_some() {
        let sum = host[summed + 2 * own] + host[2 * cols];
        acc[model.logit_scale] = Some(Tensor::from_slice(&gpu, &[sum], ls.tensor.shape())?);
    }
    Ok(GlobalLoss {
        loss: Tensor::scalar(&gpu, loss)?,
        d_image,
        d_text,
        row: 0,
    })
}

/// Tensors [n_i, E] stacked into one [sum n_i, E].
fn concat_rows(parts: Vec<Tensor>) -> Result<Tensor> {
    let n = parts.iter().map(Tensor::rows).sum::<usize>();
    let all = Tensor::empty(parts[0].gpu(), &[n, parts[0].cols()])?;
    let mut row = 0;
    for t in parts {
        all.write_rows(row, &t)?;
        row += t.rows();
    }
    Ok(all)
}

//! The batches a training run reads: loaders over the examples, this
//! rank's batches of an epoch, and an accumulation group's gradients from
//! them (full-batch accumulation streams the group: [`GroupStream`]).

use super::accumulate::{
    full_batch_grads, group_grads, AccumulationLoss, GroupGrads, MicroBatches,
};
use super::args::TrainArgs;
use super::checkpoint::RunState;
use super::setup::Setup;
use crate::data::loader::{epoch_order, LoadedBatch, Loader, LoaderConfig};
use crate::data::sources::Example;
use crate::dist::{EpochShards, World};
use crate::model::clip::Batch;
use crate::tensor::Tensor;
use crate::Gpu;
use anyhow::{ensure, Context, Result};
use std::sync::Arc;

pub(super) fn to_batch(gpu: &Arc<Gpu>, b: &LoadedBatch, s: usize) -> Result<Batch> {
    Ok(Batch {
        pixels: Tensor::from_slice(gpu, &b.pixels, &[b.batch, 3, s, s])?,
        ids: b.ids.clone(),
        mask: b.mask.clone(),
        batch: b.batch,
    })
}

/// Host bytes an accumulated step's pictures may keep for pass 2
/// (`CLIP_WGPU_GROUP_HOST_MIB`, default 1024 MiB).
pub(super) fn group_host_bytes() -> Result<usize> {
    match std::env::var("CLIP_WGPU_GROUP_HOST_MIB") {
        Err(_) => Ok(1024 << 20),
        Ok(v) => v.trim().parse::<usize>().map(|m| m << 20).map_err(|_| {
            anyhow::anyhow!("CLIP_WGPU_GROUP_HOST_MIB={v:?} is not a whole number of MiB")
        }),
    }
}

/// Full-batch accumulation's micro-batches, pulled from the epoch's loader
/// in pass 1. Their pictures wait on the host for pass 2 up to
/// `CLIP_WGPU_GROUP_HOST_MIB` (default 1024 MiB); past it, the rest are
/// decoded again for pass 2 by a second loader started where they began,
/// so a group of any size needs no more host memory than that.
struct GroupStream<'a> {
    ld: &'a mut Loader,
    first: Option<(LoadedBatch, usize)>,
    max: usize,
    /// The group's batches (pixels dropped from those not kept) and the
    /// loader position each began at.
    taken: Vec<LoadedBatch>,
    starts: Vec<usize>,
    kept: Vec<bool>,
    room: usize,
    replay: Option<Loader>,
    reopen: &'a dyn Fn(usize) -> Result<Loader>,
    gpu: &'a Arc<Gpu>,
    s: usize,
}

impl<'a> GroupStream<'a> {
    #[allow(clippy::too_many_arguments)]
    fn new(
        ld: &'a mut Loader,
        first: LoadedBatch,
        first_start: usize,
        max: usize,
        gpu: &'a Arc<Gpu>,
        s: usize,
        reopen: &'a dyn Fn(usize) -> Result<Loader>,
        room: usize,
    ) -> GroupStream<'a> {
        GroupStream {
            ld,
            first: Some((first, first_start)),
            max,
            taken: Vec::new(),
            starts: Vec::new(),
            kept: Vec::new(),
            room,
            replay: None,
            reopen,
            gpu,
            s,
        }
    }
}

impl MicroBatches for GroupStream<'_> {
    fn next(&mut self) -> Result<Option<Batch>> {
        if self.taken.len() == self.max {
            return Ok(None);
        }
        let (mut b, start) = match self.first.take() {
            Some(f) => f,
            None => {
                let start = Loader::position(self.ld);
                match self.ld.next_batch()? {
                    Some(b) => (b, start),
                    None => return Ok(None),
                }
            }
        };
        let batch = to_batch(self.gpu, &b, self.s)?;
        // Keep a prefix of the group (the replay then starts at the first
        // batch not kept and reads on from there).
        let bytes = b.pixels.len() * 4;
        let keep = self.kept.last().is_none_or(|&k| k) && bytes <= self.room;
        if keep {
            self.room -= bytes;
        } else {
            b.pixels = Vec::new();
        }
        self.kept.push(keep);
        self.taken.push(b);
        self.starts.push(start);
        Ok(Some(batch))
    }

    fn again(&mut self, i: usize) -> Result<Batch> {
        if self.kept[i] {
            return to_batch(self.gpu, &self.taken[i], self.s);
        }
        if self.replay.is_none() {
            self.replay = Some((self.reopen)(self.starts[i])?);
        }
        let r = self
            .replay
            .as_mut()
            .unwrap()
            .next_batch()?
            .context("decoding a step's pictures again: the data ended early")?;
        let b = &self.taken[i];
        ensure!(
            r.batch == b.batch && r.ids == b.ids,
            "decoding a step's pictures again gave another batch (were the data files changed during training?)"
        );
        to_batch(self.gpu, &r, self.s)
    }
}

/// How a loader cuts its order into batches (see [`LoaderConfig`]).
#[derive(Clone, Copy)]
pub(super) struct Batching {
    pub(super) size: usize,
    pub(super) drop_last: bool,
    pub(super) refill: bool,
}

pub(super) fn loader(
    setup: &Setup,
    examples: &Arc<Vec<Example>>,
    order: Vec<usize>,
    start: usize,
    args: &TrainArgs,
    how: Batching,
) -> Result<Loader> {
    let Batching {
        size: batch,
        drop_last,
        refill,
    } = how;
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
            refill,
        },
        setup.processor.clone(),
        setup.tokenizer.clone(),
    )
}

/// This rank's batches of one epoch, from where the run stands.
pub(super) struct EpochBatches<'a> {
    setup: &'a Setup,
    args: &'a TrainArgs,
    examples: &'a Arc<Vec<Example>>,
    shards: &'a EpochShards,
    dist: bool,
    /// The data epoch.
    pub(super) epoch: u64,
    order: Vec<usize>,
    how: Batching,
    ld: Loader,
    /// Global batches of this epoch done (across ranks).
    global_done: usize,
    /// Host bytes a full-batch group's pictures may keep for pass 2
    /// ([`group_host_bytes`]).
    group_host: usize,
}

impl<'a> EpochBatches<'a> {
    pub(super) fn start(
        setup: &'a Setup,
        args: &'a TrainArgs,
        examples: &'a Arc<Vec<Example>>,
        shards: &'a EpochShards,
        state: &RunState,
        world: &World,
        group_host: usize,
    ) -> Result<EpochBatches<'a>> {
        let dist = world.is_distributed();
        let epoch = state.data_epoch;
        let mut order = epoch_order(examples.len(), args.data_seed(), epoch);
        let mut start = state.data_position;
        let global_done = shards.batches_done(state.data_position);
        if dist {
            order = shards.rank_order(&order, world.size(), world.rank());
            start = shards.rank_start(state.data_position, world.size(), world.rank());
        }
        // Ranks read fixed slices (no refill past a bad picture, no
        // drop_last: their orders hold whole global batches only).
        let how = Batching {
            size: args.per_device_train_batch_size,
            drop_last: args.dataloader_drop_last && !dist,
            refill: !dist,
        };
        let ld = loader(setup, examples, order.clone(), start, args, how)?;
        Ok(EpochBatches {
            setup,
            args,
            examples,
            shards,
            dist,
            epoch,
            order,
            how,
            ld,
            global_done,
            group_host,
        })
    }

    /// The first batch of the next accumulation group and the loader
    /// position it began at; `None` at the end of the epoch.
    pub(super) fn first(&mut self) -> Result<Option<(LoadedBatch, usize)>> {
        let start = self.ld.position();
        Ok(self.ld.next_batch()?.map(|b| (b, start)))
    }

    /// The gradients of the accumulation group that `first` begins:
    /// `accum` batches, fewer at the end of the epoch; and the batches read
    /// (their pictures perhaps dropped).
    pub(super) fn gradients(
        &mut self,
        (first, group_start): (LoadedBatch, usize),
        world: &World,
    ) -> Result<(GroupGrads, Vec<LoadedBatch>)> {
        let (args, model) = (self.args, &self.setup.model);
        let accum = args.gradient_accumulation_steps.max(1);
        let gpu = model.params.params[0].tensor.gpu().clone();
        let s = model.config.vision.image_size;
        if accum > 1 && args.accumulation_loss == AccumulationLoss::Full {
            // Streamed: pass 1 pulls the batches; pass 2 has them again.
            let (setup, examples, order, how) = (self.setup, self.examples, &self.order, self.how);
            let reopen = |start: usize| loader(setup, examples, order.clone(), start, args, how);
            let mut src = GroupStream::new(
                &mut self.ld,
                first,
                group_start,
                accum,
                &gpu,
                s,
                &reopen,
                self.group_host,
            );
            let out = full_batch_grads(model, &mut src, world)?;
            Ok((out, src.taken))
        } else {
            let mut group = vec![first];
            while group.len() < accum {
                match self.ld.next_batch()? {
                    Some(b) => group.push(b),
                    None => break,
                }
            }
            let out = group_grads(
                model,
                args.accumulation_loss,
                group.len(),
                |i| to_batch(&gpu, &group[i], s),
                world,
            )?;
            Ok((out, group))
        }
    }

    /// The data position (in the epoch's whole order) after a step of
    /// `group_len` batches.
    pub(super) fn position_after(&mut self, group_len: usize) -> usize {
        if self.dist {
            self.global_done += group_len;
            self.shards.global_position(self.global_done)
        } else {
            self.ld.position()
        }
    }
}

//! The batches a training run reads: loaders over the examples (or over a
//! WebDataset stream: [`AnyLoader`]), this rank's batches of an epoch, and
//! an accumulation group's gradients from them (full-batch accumulation
//! streams the group: [`GroupStream`]).

use super::accumulate::{
    full_batch_grads_scaled, group_grads_scaled, AccumulationLoss, GroupGrads, MicroBatches,
};
use super::args::TrainArgs;
use super::checkpoint::RunState;
use super::setup::Setup;
use crate::data::loader::{epoch_order, LoadedBatch, Loader, LoaderConfig};
use crate::data::sources::Example;
use crate::data::webdataset::{ResumePoint, ResumePoints, ShardSet, StreamConfig, StreamLoader};
use crate::dist::{EpochShards, World};
use crate::model::clip::Batch;
use crate::tensor::Tensor;
use crate::Gpu;
use anyhow::{bail, ensure, Context, Result};
use serde_json::Value;
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
struct GroupStream<'a, 'w> {
    ld: &'a mut AnyLoader<'w>,
    first: Option<(LoadedBatch, usize)>,
    max: usize,
    /// The group's batches (pixels dropped from those not kept) and the
    /// loader position each began at.
    taken: Vec<LoadedBatch>,
    starts: Vec<usize>,
    kept: Vec<bool>,
    room: usize,
    replay: Option<AnyLoader<'w>>,
    reopen: &'a dyn Fn(usize) -> Result<AnyLoader<'w>>,
    gpu: &'a Arc<Gpu>,
    s: usize,
}

impl<'a, 'w> GroupStream<'a, 'w> {
    #[allow(clippy::too_many_arguments)]
    fn new(
        ld: &'a mut AnyLoader<'w>,
        first: LoadedBatch,
        first_start: usize,
        max: usize,
        gpu: &'a Arc<Gpu>,
        s: usize,
        reopen: &'a dyn Fn(usize) -> Result<AnyLoader<'w>>,
        room: usize,
    ) -> GroupStream<'a, 'w> {
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

impl MicroBatches for GroupStream<'_, '_> {
    fn next(&mut self) -> Result<Option<Batch>> {
        if self.taken.len() == self.max {
            return Ok(None);
        }
        let (mut b, start) = match self.first.take() {
            Some(f) => f,
            None => {
                let start = self.ld.position();
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

/// A loader over a list of examples, or over a WebDataset stream.
pub(super) enum AnyLoader<'w> {
    Index(Loader),
    Stream {
        ld: StreamLoader,
        /// Under mpirun: every rank gets a batch or none does (their
        /// streams differ in length), agreed at each batch.
        agree: Option<&'w World>,
        ended: bool,
    },
}

impl AnyLoader<'_> {
    pub(super) fn next_batch(&mut self) -> Result<Option<LoadedBatch>> {
        match self {
            AnyLoader::Index(l) => l.next_batch(),
            AnyLoader::Stream { ld, agree, ended } => {
                if *ended {
                    return Ok(None);
                }
                let b = ld.next_batch()?;
                if let Some(w) = agree {
                    let mut have = [f32::from(u8::from(b.is_some()))];
                    w.all_reduce_sum(&mut have);
                    if (have[0].round() as usize) < w.size() {
                        *ended = true;
                        return Ok(None);
                    }
                }
                Ok(b)
            }
        }
    }

    /// Entries of the order (samples of the stream) the returned batches
    /// used.
    pub(super) fn position(&self) -> usize {
        match self {
            AnyLoader::Index(l) => l.position(),
            AnyLoader::Stream { ld, .. } => ld.position() as usize,
        }
    }
}

/// How a loader cuts its order into batches (see [`LoaderConfig`]).
#[derive(Clone, Copy)]
pub(super) struct Batching {
    pub(super) size: usize,
    pub(super) drop_last: bool,
    pub(super) refill: bool,
}

fn loader_config(setup: &Setup, args: &TrainArgs, how: Batching) -> LoaderConfig {
    LoaderConfig {
        batch_size: how.size,
        max_len: setup.max_len,
        workers: args.workers.max(1),
        prefetch: 4,
        drop_last: how.drop_last,
        refill: how.refill,
    }
}

pub(super) fn loader(
    setup: &Setup,
    examples: &Arc<Vec<Example>>,
    order: Vec<usize>,
    start: usize,
    args: &TrainArgs,
    how: Batching,
) -> Result<Loader> {
    Loader::new(
        examples.clone(),
        order,
        start,
        loader_config(setup, args, how),
        setup.processor.clone(),
        setup.tokenizer.clone(),
    )
}

/// A WebDataset stream's loader from `resume` (or the epoch's start).
fn stream_loader(
    setup: &Setup,
    set: &Arc<ShardSet>,
    cfg: &StreamConfig,
    resume: Option<ResumePoint>,
    args: &TrainArgs,
    how: Batching,
) -> Result<StreamLoader> {
    StreamLoader::new(
        set.clone(),
        cfg.clone(),
        resume,
        loader_config(setup, args, how),
        setup.processor.clone(),
        setup.tokenizer.clone(),
        // The trainer drops old resume points itself (forget_before).
        usize::MAX / 2,
    )
}

/// Samples between snapshots of a training stream
/// (`CLIP_WGPU_WDS_SNAPSHOT_EVERY`, for tests; default 256).
fn snapshot_every() -> Result<usize> {
    match std::env::var("CLIP_WGPU_WDS_SNAPSHOT_EVERY") {
        Err(_) => Ok(crate::data::webdataset::DEFAULT_SNAPSHOT_EVERY),
        Ok(v) => match v.trim().parse::<usize>() {
            Ok(n) if n > 0 => Ok(n),
            _ => bail!("CLIP_WGPU_WDS_SNAPSHOT_EVERY={v:?} is not a whole number >= 1"),
        },
    }
}

/// A rank's stream of `epoch`: what fixes it.
pub(super) fn stream_config(
    args: &TrainArgs,
    world: &World,
    epoch: u64,
    max_samples: Option<usize>,
) -> Result<StreamConfig> {
    Ok(StreamConfig {
        seed: args.data_seed(),
        epoch,
        rank: world.rank(),
        world: world.size(),
        shuffle_buffer: args.shuffle_buffer.max(1),
        max_samples: max_samples.map(|m| m as u64),
        snapshot_every: snapshot_every()?,
    })
}

/// This rank's resume point in a checkpoint's `data_stream` (one object,
/// or one per rank under mpirun).
fn rank_resume(v: &Value, world: &World) -> Result<ResumePoint> {
    let mine = match v {
        Value::Array(all) => {
            ensure!(
                all.len() == world.size(),
                "the checkpoint's data stream was read by {} rank(s), this run has {}: the \
                 shards would be dealt differently. Pass --ignore_data_skip to start the epoch \
                 again instead",
                all.len(),
                world.size()
            );
            &all[world.rank()]
        }
        one => {
            ensure!(
                world.size() == 1,
                "the checkpoint's data stream was read by one process, this run has {} ranks: \
                 pass --ignore_data_skip to start the epoch again instead",
                world.size()
            );
            one
        }
    };
    ResumePoint::from_json(mine).context("the checkpoint's data stream state")
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
    ld: AnyLoader<'a>,
    /// A WebDataset stream: its shards, what fixes it, and its resume
    /// points.
    stream: Option<(Arc<ShardSet>, StreamConfig, ResumePoints)>,
    /// Global batches of this epoch done (across ranks).
    global_done: usize,
    /// Host bytes a full-batch group's pictures may keep for pass 2
    /// ([`group_host_bytes`]).
    group_host: usize,
}

impl<'a> EpochBatches<'a> {
    #[allow(clippy::too_many_arguments)]
    pub(super) fn start(
        setup: &'a Setup,
        args: &'a TrainArgs,
        examples: &'a Arc<Vec<Example>>,
        shards: &'a EpochShards,
        state: &RunState,
        world: &'a World,
        group_host: usize,
        stream_samples: Option<usize>,
    ) -> Result<EpochBatches<'a>> {
        let dist = world.is_distributed();
        let epoch = state.data_epoch;
        if let Some(set) = &setup.train_stream {
            // Each rank streams its own shards, in batches of its own.
            let cfg = stream_config(args, world, epoch, stream_samples)?;
            let resume = match &state.data_stream {
                Some(v) if state.data_position > 0 => {
                    let r = rank_resume(v, world)?;
                    ensure!(
                        r.snapshot.epoch == epoch,
                        "the checkpoint's data stream state is of epoch {}, its run state of epoch {epoch}",
                        r.snapshot.epoch
                    );
                    Some(r)
                }
                _ => None,
            };
            let how = Batching {
                size: args.per_device_train_batch_size,
                drop_last: args.dataloader_drop_last,
                refill: true,
            };
            let ld = stream_loader(setup, set, &cfg, resume, args, how)?;
            let points = ld.resume_points();
            return Ok(EpochBatches {
                setup,
                args,
                examples,
                shards,
                dist,
                epoch,
                order: Vec::new(),
                how,
                ld: AnyLoader::Stream {
                    ld,
                    agree: dist.then_some(world),
                    ended: false,
                },
                stream: Some((set.clone(), cfg, points)),
                global_done: 0,
                group_host,
            });
        }
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
        let ld = AnyLoader::Index(loader(setup, examples, order.clone(), start, args, how)?);
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
            stream: None,
            global_done,
            group_host,
        })
    }

    /// The first batch of the next accumulation group and the loader
    /// position it began at; `None` at the end of the epoch.
    pub(super) fn first(&mut self) -> Result<Option<(LoadedBatch, usize)>> {
        let start = self.ld.position();
        if let AnyLoader::Stream { ld, .. } = &self.ld {
            // Nothing before this group is resumed from again.
            ld.forget_before(start as u64);
        }
        Ok(self.ld.next_batch()?.map(|b| (b, start)))
    }

    /// The gradients of the accumulation group that `first` begins:
    /// `accum` batches, fewer at the end of the epoch; and the batches read
    /// (their pictures perhaps dropped). The backward is seeded
    /// `loss_scale` times larger (fp16's loss scaling; 1 otherwise).
    pub(super) fn gradients(
        &mut self,
        (first, group_start): (LoadedBatch, usize),
        world: &World,
        loss_scale: f32,
    ) -> Result<(GroupGrads, Vec<LoadedBatch>)> {
        let (args, model) = (self.args, &self.setup.model);
        let accum = args.gradient_accumulation_steps.max(1);
        let gpu = model.params.params[0].tensor.gpu().clone();
        let s = model.config.vision.image_size;
        if accum > 1 && args.accumulation_loss == AccumulationLoss::Full {
            // Streamed: pass 1 pulls the batches; pass 2 has them again.
            let (setup, examples, order, how) = (self.setup, self.examples, &self.order, self.how);
            let stream = &self.stream;
            let reopen = |start: usize| -> Result<AnyLoader<'a>> {
                match stream {
                    None => Ok(AnyLoader::Index(loader(
                        setup,
                        examples,
                        order.clone(),
                        start,
                        args,
                        how,
                    )?)),
                    Some((set, cfg, points)) => {
                        let r = points
                            .at(start as u64)
                            .context("decoding a step's pictures again: no resume point")?;
                        Ok(AnyLoader::Stream {
                            ld: stream_loader(setup, set, cfg, Some(r), args, how)?,
                            agree: None,
                            ended: false,
                        })
                    }
                }
            };
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
            let out = full_batch_grads_scaled(model, &mut src, world, loss_scale)?;
            Ok((out, src.taken))
        } else {
            let mut group = vec![first];
            while group.len() < accum {
                match self.ld.next_batch()? {
                    Some(b) => group.push(b),
                    None => break,
                }
            }
            let out = group_grads_scaled(
                model,
                args.accumulation_loss,
                group.len(),
                |i| to_batch(&gpu, &group[i], s),
                world,
                loss_scale,
            )?;
            Ok((out, group))
        }
    }

    /// The data position (in the epoch's whole order) after a step of
    /// `group_len` batches.
    pub(super) fn position_after(&mut self, group_len: usize) -> usize {
        if self.stream.is_some() {
            return self.ld.position();
        }
        if self.dist {
            self.global_done += group_len;
            self.shards.global_position(self.global_done)
        } else {
            self.ld.position()
        }
    }
}

impl EpochBatches<'_> {
    /// A WebDataset stream's progress through this rank's shards of the
    /// epoch (0 to 1; the reader runs ahead by the shuffle buffer), for the
    /// fractional epoch when the number of samples is not known.
    pub(super) fn stream_progress(&self) -> Option<f64> {
        let (set, cfg, points) = self.stream.as_ref()?;
        let p = points.at(self.ld.position() as u64)?;
        let n = crate::data::webdataset::rank_shards(set.shards.len(), cfg).len();
        Some((p.snapshot.shard as f64 / n.max(1) as f64).min(1.0))
    }

    /// Where a WebDataset stream stands after the batches so far, for the
    /// checkpoint: this rank's resume point, or under mpirun every rank's
    /// (gathered; every rank calls this at each step). None for other data.
    pub(super) fn stream_state(&self, world: &World) -> Result<Option<Value>> {
        let Some((_, _, points)) = &self.stream else {
            return Ok(None);
        };
        let pos = self.ld.position() as u64;
        let mine = points
            .at(pos)
            .context("the data stream has no resume point for its position")?
            .to_json();
        if !world.is_distributed() {
            return Ok(Some(mine));
        }
        let all = world.all_gather_bytes(mine.to_string().as_bytes());
        let mut v = Vec::with_capacity(all.len());
        for (r, b) in all.iter().enumerate() {
            v.push(
                serde_json::from_slice::<Value>(b)
                    .with_context(|| format!("rank {r}'s data stream state"))?,
            );
        }
        Ok(Some(Value::Array(v)))
    }
}

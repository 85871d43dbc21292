//! Data-parallel training across processes: one process per adapter,
//! started by `mpirun`, talking through MPI (the `mpi` cargo feature; see
//! [`mpi`]). Without the feature, or with one process, [`World::single`]
//! makes every collective a no-op and training is what it always was.
//!
//! What crosses the wire each step (OpenCLIP's scheme, made exact):
//! - the L2-normalised embeddings of every rank's rows, all-gathered, so
//!   each rank computes the contrastive loss over the global batch and its
//!   gradient for its own rows ([`crate::train::accumulate`]);
//! - the parameter gradients, summed (all-reduce), so every rank takes the
//!   step one process would take on the global batch.
//!
//! Collectives run on host copies: the GPU buffers are read back, reduced
//! by MPI and written again. That keeps wgpu and MPI independent (no
//! GPU-direct transport exists for wgpu) at the cost of a PCIe round trip,
//! which the README's estimate counts.

#[cfg(feature = "mpi")]
pub mod mpi;

use crate::tensor::Tensor;
use anyhow::{bail, ensure, Result};
use std::cell::Cell;
use std::time::Instant;

/// The collectives training needs, as a transport provides them. Every
/// rank calls the same ones in the same order.
pub trait Transport {
    /// Sum `buf` element-wise over all ranks, in place (every rank gets the
    /// same result).
    fn all_reduce_sum(&self, buf: &mut [f32]);
    /// Every rank's `local` (lengths may differ), in rank order.
    fn all_gather_bytes(&self, local: &[u8]) -> Vec<Vec<u8>>;
    fn barrier(&self);
    /// End the whole job (every rank) with `code`.
    fn abort(&self, code: i32) -> !;
}

/// Time and volume spent in collectives since the last [`World::take_stats`].
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct CommStats {
    pub calls: u64,
    pub seconds: f64,
    /// Bytes this rank sends with ring algorithms: an all-reduce of S bytes
    /// over W ranks sends 2 (W-1)/W S, an all-gather (W-1) x its own part.
    pub bytes_sent: u64,
}

/// This process's place in the job.
pub struct World {
    rank: usize,
    size: usize,
    local_rank: usize,
    transport: Option<Box<dyn Transport>>,
    stats: Cell<CommStats>,
    local_loss: Cell<bool>,
}

impl World {
    /// One process alone: collectives return their input.
    pub fn single() -> World {
        World {
            rank: 0,
            size: 1,
            local_rank: 0,
            transport: None,
            stats: Cell::new(CommStats::default()),
            local_loss: Cell::new(false),
        }
    }

    /// A world over `transport` (rank `rank` of `size`; `local_rank` among
    /// the ranks on this machine).
    pub fn new(
        rank: usize,
        size: usize,
        local_rank: usize,
        transport: Box<dyn Transport>,
    ) -> World {
        World {
            rank,
            size,
            local_rank,
            transport: (size > 1).then_some(transport),
            stats: Cell::new(CommStats::default()),
            local_loss: Cell::new(false),
        }
    }

    pub fn rank(&self) -> usize {
        self.rank
    }

    pub fn size(&self) -> usize {
        self.size
    }

    pub fn local_rank(&self) -> usize {
        self.local_rank
    }

    /// Rank 0: the one that writes files, logs and the progress bar.
    pub fn is_main(&self) -> bool {
        self.rank == 0
    }

    pub fn is_distributed(&self) -> bool {
        self.transport.is_some()
    }

    /// OpenCLIP's `--local_loss`: each rank computes the contrastive loss of
    /// its own rows against all gathered columns (n x N) instead of the
    /// whole N x N, with the same gradient (see ops::loss_local).
    pub fn set_local_loss(&self, on: bool) {
        self.local_loss.set(on);
    }

    pub fn local_loss(&self) -> bool {
        self.local_loss.get() && self.is_distributed()
    }

    fn count(&self, t0: Instant, bytes: u64) {
        let mut s = self.stats.get();
        s.calls += 1;
        s.seconds += t0.elapsed().as_secs_f64();
        s.bytes_sent += bytes;
        self.stats.set(s);
    }

    /// Collective statistics so far; resets them.
    pub fn take_stats(&self) -> CommStats {
        self.stats.replace(CommStats::default())
    }

    /// Element-wise sum over ranks, in place.
    pub fn all_reduce_sum(&self, buf: &mut [f32]) {
        if let Some(t) = &self.transport {
            let t0 = Instant::now();
            t.all_reduce_sum(buf);
            let w = self.size as u64;
            self.count(t0, 2 * (w - 1) * (buf.len() as u64 * 4) / w);
        }
    }

    /// Every rank's bytes, in rank order.
    pub fn all_gather_bytes(&self, local: &[u8]) -> Vec<Vec<u8>> {
        match &self.transport {
            None => vec![local.to_vec()],
            Some(t) => {
                let t0 = Instant::now();
                let all = t.all_gather_bytes(local);
                self.count(t0, (self.size as u64 - 1) * local.len() as u64);
                all
            }
        }
    }

    /// Every rank's values, in rank order.
    pub fn all_gather_f32(&self, local: &[f32]) -> Vec<Vec<f32>> {
        self.all_gather_bytes(bytemuck::cast_slice(local))
            .into_iter()
            .map(|b| bytemuck::pod_collect_to_vec(&b))
            .collect()
    }

    pub fn barrier(&self) {
        if let Some(t) = &self.transport {
            let t0 = Instant::now();
            t.barrier();
            self.count(t0, 0);
        }
    }

    /// End the job: every rank (MPI_Abort), or this process alone.
    pub fn abort(&self, code: i32) -> ! {
        match &self.transport {
            Some(t) => t.abort(code),
            None => std::process::exit(code),
        }
    }

    /// Fail unless every rank gives the same `what` (a description of its
    /// configuration): ranks started with different data or flags would
    /// deadlock or silently train on something else.
    pub fn check_same(&self, topic: &str, what: &str) -> Result<()> {
        let all = self.all_gather_bytes(what.as_bytes());
        for (r, w) in all.iter().enumerate() {
            if w.as_slice() != what.as_bytes() {
                bail!(
                    "ranks disagree on {topic}: rank {} has {}, rank {r} has {}",
                    self.rank,
                    what,
                    String::from_utf8_lossy(w)
                );
            }
        }
        Ok(())
    }

    /// Every rank's rows of `image` and `text` (both [n_r, E]), each as an
    /// [N, E] tensor in rank order, and where this rank's rows begin: one
    /// readback and one gather for both. One process: the inputs.
    pub fn all_gather_pair(&self, image: Tensor, text: Tensor) -> Result<(Tensor, Tensor, usize)> {
        if !self.is_distributed() {
            return Ok((image, text, 0));
        }
        let (n, e) = (image.rows(), image.cols());
        ensure!(
            text.shape() == image.shape(),
            "gathering embeddings: image {:?} and text {:?} differ",
            image.shape(),
            text.shape()
        );
        let both = Tensor::empty(image.gpu(), &[2 * n, e])?;
        both.write_rows(0, &image)?;
        both.write_rows(n, &text)?;
        let parts = self.all_gather_f32(&both.to_vec()?);
        let (mut all_i, mut all_t) = (Vec::new(), Vec::new());
        let mut offset = 0;
        for (r, p) in parts.iter().enumerate() {
            ensure!(
                p.len() % (2 * e) == 0,
                "rank {r} sent {} values, not pairs of rows of {e}",
                p.len()
            );
            if r == self.rank {
                offset = all_i.len() / e;
            }
            let (i, t) = p.split_at(p.len() / 2);
            all_i.extend_from_slice(i);
            all_t.extend_from_slice(t);
        }
        let rows = all_i.len() / e;
        let gpu = image.gpu();
        Ok((
            Tensor::from_slice(gpu, &all_i, &[rows, e])?,
            Tensor::from_slice(gpu, &all_t, &[rows, e])?,
            offset,
        ))
    }
}

// ---------------------------------------------------------------------------
// Gradients.

/// Most bytes read back and reduced at once: buckets keep each staging
/// buffer well inside every adapter's max_buffer_size.
const BUCKET_BYTES: usize = 64 << 20;

/// Sum the gradients of `trainable` parameters over all ranks, in place
/// (store order; `None` where this rank has none, then made present if
/// another rank has one). Entries of `rank0_only` are counted from rank 0
/// alone: gradients every rank computed whole (logit_scale's, from the
/// loss over the gathered batch) rather than from its own rows. `flags`
/// ride along in the first bucket and come back summed (a stop request,
/// for one). Returns the summed flags.
pub fn all_reduce_grads(
    world: &World,
    trainable: &[bool],
    grads: &mut [Option<Tensor>],
    shapes: &[Vec<usize>],
    rank0_only: &[usize],
    flags: &[f32],
) -> Result<Vec<f32>> {
    if !world.is_distributed() {
        return Ok(flags.to_vec());
    }
    let gpu = match grads.iter().flatten().next() {
        Some(g) => g.gpu().clone(),
        None => bail!("no gradients to reduce"),
    };
    let idx: Vec<usize> = (0..grads.len()).filter(|&i| trainable[i]).collect();
    let numel = |i: usize| shapes[i].iter().product::<usize>();
    // Consecutive parameters, up to BUCKET_BYTES each (one alone if larger).
    let mut buckets: Vec<Vec<usize>> = vec![Vec::new()];
    let mut size = 0;
    for &i in &idx {
        let b = numel(i) * 4;
        if size + b > BUCKET_BYTES && !buckets.last().unwrap().is_empty() {
            buckets.push(Vec::new());
            size = 0;
        }
        buckets.last_mut().unwrap().push(i);
        size += b;
    }
    // Which ranks have each gradient, and the flags, ride with the first
    // bucket: a gradient only another rank has is made before any copy back.
    let mut out_flags = Vec::new();
    for (bi, bucket) in buckets.iter().enumerate() {
        let total: usize = bucket.iter().map(|&i| numel(i)).sum();
        let staging = Tensor::empty(&gpu, &[total])?;
        let mut at = 0u64;
        for &i in bucket {
            if let Some(g) = &grads[i] {
                gpu.copy_at(g.buffer(), 0, staging.buffer(), at, (numel(i) * 4) as u64);
            }
            at += (numel(i) * 4) as u64;
        }
        let mut host = staging.to_vec()?;
        let mut at = 0;
        for &i in bucket {
            let n = numel(i);
            if grads[i].is_none() || (world.rank() != 0 && rank0_only.contains(&i)) {
                host[at..at + n].fill(0.0);
            }
            at += n;
        }
        let extra = if bi == 0 {
            let mut e: Vec<f32> = idx
                .iter()
                .map(|&i| f32::from(u8::from(grads[i].is_some())))
                .collect();
            e.extend_from_slice(flags);
            e
        } else {
            Vec::new()
        };
        host.extend_from_slice(&extra);
        world.all_reduce_sum(&mut host);
        let (values, extra) = host.split_at(total);
        if bi == 0 {
            out_flags = extra[idx.len()..].to_vec();
            for (k, &i) in idx.iter().enumerate() {
                if extra[k] > 0.0 && grads[i].is_none() {
                    grads[i] = Some(Tensor::zeros(&gpu, &shapes[i])?);
                }
            }
        }
        staging.write(values)?;
        let mut at = 0u64;
        for &i in bucket {
            let bytes = (numel(i) * 4) as u64;
            if let Some(g) = &grads[i] {
                gpu.copy_at(staging.buffer(), at, g.buffer(), 0, bytes);
            }
            at += bytes;
        }
    }
    Ok(out_flags)
}

// ---------------------------------------------------------------------------
// Sharding.

/// The rows `start..end` of `n` that rank `rank` of `world` takes: a
/// balanced contiguous split (sizes differ by at most one).
pub fn shard(n: usize, world: usize, rank: usize) -> std::ops::Range<usize> {
    (rank * n / world)..((rank + 1) * n / world)
}

/// How an epoch's examples split into global batches of `world x batch`
/// and each rank's part of each: the order a single process would read
/// with batch `world x batch`, rank `r` reading slice `r` of every global
/// batch. A last global batch of fewer than `world` examples is dropped
/// (every rank needs a row); with `drop_last` every partial one is.
#[derive(Clone, Debug)]
pub struct EpochShards {
    /// Examples per global batch (`world x batch`).
    pub global_batch: usize,
    /// Global batches in the epoch.
    pub batches: usize,
    /// Examples the epoch's global batches use.
    pub used: usize,
}

impl EpochShards {
    pub fn new(n: usize, world: usize, batch: usize, drop_last: bool) -> EpochShards {
        let g = world * batch;
        let full = n / g;
        let rem = n % g;
        let partial = !drop_last && rem >= world && rem > 0;
        EpochShards {
            global_batch: g,
            batches: full + usize::from(partial),
            used: full * g + if partial { rem } else { 0 },
        }
    }

    /// Rank `rank`'s part of `order` (the epoch's single-process order),
    /// as one order its loader reads in batches of `batch`: slice `rank` of
    /// each global batch.
    pub fn rank_order(&self, order: &[usize], world: usize, rank: usize) -> Vec<usize> {
        let mut out = Vec::new();
        for b in 0..self.batches {
            let start = b * self.global_batch;
            let len = self.global_batch.min(self.used - start);
            let r = shard(len, world, rank);
            out.extend_from_slice(&order[start + r.start..start + r.end]);
        }
        out
    }

    /// Where in its rank order a rank starts when `global` examples of the
    /// epoch are done (a multiple of the global batch, or the end).
    pub fn rank_start(&self, global: usize, world: usize, rank: usize) -> usize {
        (0..self.batches_done(global))
            .map(|b| {
                let len = self.global_batch.min(self.used - b * self.global_batch);
                shard(len, world, rank).len()
            })
            .sum()
    }

    /// Global batches done when `global` examples of the epoch are.
    pub fn batches_done(&self, global: usize) -> usize {
        if global >= self.used {
            self.batches
        } else {
            global / self.global_batch
        }
    }

    /// Examples of the epoch in global batches `0..b`.
    pub fn global_position(&self, b: usize) -> usize {
        (b * self.global_batch).min(self.used)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_cover_each_global_batch_in_order() {
        for (n, w, b, drop) in [
            (48, 2, 8, false),
            (50, 2, 8, false),
            (49, 3, 4, false),
            (50, 4, 4, true),
            (17, 4, 4, false),
        ] {
            let s = EpochShards::new(n, w, b, drop);
            let order: Vec<usize> = (0..n).rev().collect();
            let parts: Vec<Vec<usize>> = (0..w).map(|r| s.rank_order(&order, w, r)).collect();
            // Global batch k is the ranks' k-th batches, concatenated: the
            // single-process batch k of size w x b.
            let mut pos = vec![0; w];
            for k in 0..s.batches {
                let mut global = Vec::new();
                for r in 0..w {
                    let len = (s.global_batch.min(s.used - k * s.global_batch) * (r + 1) / w)
                        - (s.global_batch.min(s.used - k * s.global_batch) * r / w);
                    assert!(len >= 1 && len <= b, "rank {r} gets {len} rows");
                    global.extend_from_slice(&parts[r][pos[r]..pos[r] + len]);
                    pos[r] += len;
                }
                let g0 = k * s.global_batch;
                assert_eq!(global, order[g0..g0 + global.len()].to_vec());
                for (r, p) in pos.iter().enumerate() {
                    assert_eq!(s.rank_start(s.global_position(k + 1), w, r), *p);
                }
            }
            assert_eq!(pos.iter().sum::<usize>(), s.used);
            assert!(n - s.used < if drop { s.global_batch } else { w });
        }
    }
}

//! Top-k of each row of a score matrix (shaders/topk.wgsl), and ranking by
//! similarity on the GPU built on it: queries x keys^T through the tuned
//! matmul, then the k best keys of each query, block by block so that the
//! whole query x key matrix never exists (evaluation's recall@K, `search`).
//!
//! The order is total: higher score first, equal scores by lower index, as
//! the CPU references (and `train::metrics`' recall) break ties. Scores
//! must be finite.

use super::layernorm::Rows;
use super::matmul::{gemm, Gemm};
use super::positions::column_positions;
use super::{shader, u};
use crate::gpu::Shader;
use crate::tensor::Tensor;
use crate::Gpu;
use anyhow::{ensure, Result};
use std::sync::Arc;

const SHADER: Shader = shader!("topk");

/// Entries one kernel pass finds per row (`KMAX` in the shader); a larger
/// k takes several passes, each continuing where the previous stopped.
pub const PASS_K: usize = 32;

/// Bytes of scores one block of [`rank`] computes at once (also bounded by
/// what the adapter binds).
const BLOCK_BYTES: u64 = 32 << 20;

/// The `k` best columns of each row of `scores` (a [rows, stride] tensor of
/// which the first `cols` columns count), best first: (values, indices),
/// each [rows, k] (the indices as u32 bits). `k` is at most `cols`.
pub fn topk(
    scores: &Tensor,
    rows: usize,
    cols: usize,
    stride: usize,
    k: usize,
) -> Result<(Tensor, Tensor)> {
    topk_with(scores, rows, cols, stride, k, None)
}

/// `topk` with a forced layout (tests, bench).
pub fn topk_with(
    scores: &Tensor,
    rows: usize,
    cols: usize,
    stride: usize,
    k: usize,
    layout: Option<Rows>,
) -> Result<(Tensor, Tensor)> {
    ensure!(
        cols <= stride,
        "topk: {cols} columns are more than the row stride {stride}"
    );
    topk_strided_with(scores, rows, cols, stride, 1, k, layout)
}

/// The `k` best of each column of a [n, stride] matrix's first `cols`
/// columns, over its first `rows` rows: (values, indices) [cols, k], the
/// indices rows.
pub fn topk_columns(
    scores: &Tensor,
    rows: usize,
    cols: usize,
    stride: usize,
    k: usize,
) -> Result<(Tensor, Tensor)> {
    ensure!(
        cols <= stride,
        "topk: {cols} columns are more than the row stride {stride}"
    );
    topk_strided_with(scores, cols, rows, 1, stride, k, None)
}

/// The general form: `rows` sequences of `cols` scores, sequence r's entry
/// c at `r * stride + c * cstride`.
pub fn topk_strided_with(
    scores: &Tensor,
    rows: usize,
    cols: usize,
    stride: usize,
    cstride: usize,
    k: usize,
    layout: Option<Rows>,
) -> Result<(Tensor, Tensor)> {
    ensure!(
        k >= 1 && k <= cols,
        "topk: k {k} must be in 1..={cols} (the entries of a row)"
    );
    let last = (rows.max(1) - 1) * stride + (cols - 1) * cstride;
    ensure!(
        scores.numel() > last,
        "topk: {rows} rows of {cols} (strides {stride}, {cstride}) reach element {last}, the tensor {:?} has {}",
        scores.shape(),
        scores.numel()
    );
    let gpu = scores.gpu();
    let values = Tensor::empty(gpu, &[rows, k])?;
    let indices = Tensor::empty(gpu, &[rows, k])?;
    let (entry, groups) = Rows::pick(gpu, layout).launch(gpu, "topk", rows);
    for off in (0..k).step_by(PASS_K) {
        let pass = PASS_K.min(k - off);
        gpu.dispatch(
            &SHADER,
            &entry,
            &[
                u(rows),
                u(cols),
                u(stride),
                u(pass),
                u(k),
                u(off),
                u(cstride),
                0,
            ],
            &[
                Some(scores.buffer()),
                Some(values.buffer()),
                Some(indices.buffer()),
            ],
            groups,
        )?;
    }
    Ok((values, indices))
}

/// Indices read back from a [`topk`] result.
pub fn indices_to_vec(t: &Tensor) -> Result<Vec<u32>> {
    Ok(bytemuck::cast_slice(&t.to_vec()?).to_vec())
}

/// Whether (v, i) ranks before (w, j): higher score, then lower index.
pub fn ranks_before(v: f32, i: u32, w: f32, j: u32) -> bool {
    v > w || (v == w && i < j)
}

/// CPU reference of [`topk`] on a host [rows, cols] matrix.
pub fn topk_ref(scores: &[f32], cols: usize, k: usize) -> (Vec<f32>, Vec<u32>) {
    let (mut vals, mut idx) = (Vec::new(), Vec::new());
    for row in scores.chunks(cols) {
        let mut order: Vec<u32> = (0..cols as u32).collect();
        order.sort_by(|&a, &b| {
            row[b as usize]
                .partial_cmp(&row[a as usize])
                .unwrap()
                .then(a.cmp(&b))
        });
        for &c in &order[..k] {
            vals.push(row[c as usize]);
            idx.push(c);
        }
    }
    (vals, idx)
}

/// The k best keys of each query, best first ([`rank`]'s result).
#[derive(Clone, Debug, PartialEq)]
pub struct Ranking {
    /// Entries per query: `min(k asked, keys)`.
    pub k: usize,
    /// [queries, k] similarities (dot products).
    pub values: Vec<f32>,
    /// [queries, k] key indices.
    pub indices: Vec<u32>,
}

impl Ranking {
    /// Query `q`'s key indices, best first.
    pub fn row(&self, q: usize) -> &[u32] {
        &self.indices[q * self.k..(q + 1) * self.k]
    }

    /// Query `q`'s similarities, best first.
    pub fn row_values(&self, q: usize) -> &[f32] {
        &self.values[q * self.k..(q + 1) * self.k]
    }
}

/// Rank `keys` ([n, dim], row-major, on the host) for each of `queries`
/// ([q, dim]) by dot product on the GPU: the k best of each (all of them
/// when there are fewer). The scores are computed a block of queries at a
/// time (at most 32 MiB of them, [`BLOCK_BYTES`]), and keys more than the
/// adapter binds at once are ranked in chunks whose best are merged on the
/// host, so any number of keys works. Rows are padded to multiples of 4 with
/// zeros for the vec4 matmul kernels, and every block has the same shape (so
/// the tuner times one). Every value must be finite.
pub fn rank(
    gpu: &Arc<Gpu>,
    queries: &[f32],
    keys: &[f32],
    dim: usize,
    k: usize,
) -> Result<Ranking> {
    Ok(rank_impl(gpu, queries, keys, dim, k, None)?.0)
}

/// [`rank`], and for each key the position of its own query among all
/// queries ranked for that key (`owners[key]`: a query index): how many
/// queries rank before it, by the same order, from the same product. A key
/// with its own query at position p is found in the top K for every K > p.
/// Evaluation's image-to-text (the ranking) and text-to-image (the
/// positions) retrieval.
///
/// Each block holds every query, so that a key's whole column is counted in
/// one pass ([`column_positions`]); the blocks then take fewer keys.
pub fn rank_with_positions(
    gpu: &Arc<Gpu>,
    queries: &[f32],
    keys: &[f32],
    dim: usize,
    k: usize,
    owners: &[u32],
) -> Result<(Ranking, Vec<u32>)> {
    let (ranking, positions) = rank_impl(gpu, queries, keys, dim, k, Some(owners))?;
    Ok((ranking, positions.expect("asked for positions")))
}

fn rank_impl(
    gpu: &Arc<Gpu>,
    queries: &[f32],
    keys: &[f32],
    dim: usize,
    k: usize,
    owners: Option<&[u32]>,
) -> Result<(Ranking, Option<Vec<u32>>)> {
    ensure!(dim > 0, "rank: embeddings of dimension 0");
    ensure!(
        queries.len().is_multiple_of(dim) && keys.len().is_multiple_of(dim),
        "rank: {} query and {} key values are not whole rows of {dim}",
        queries.len(),
        keys.len()
    );
    for (what, v) in [("query", queries), ("key", keys)] {
        if let Some(p) = v.iter().position(|x| !x.is_finite()) {
            anyhow::bail!("rank: {what} {} has a non-finite value", p / dim);
        }
    }
    let (nq, nk) = (queries.len() / dim, keys.len() / dim);
    if let Some(o) = owners {
        ensure!(o.len() == nk, "rank: {} owners for {nk} keys", o.len());
        if let Some(&bad) = o.iter().find(|&&q| q as usize >= nq) {
            anyhow::bail!("rank: a key's own query {bad} is not one of the {nq} queries");
        }
    }
    let k_keys = k.min(nk);
    let empty = |k| Ranking {
        k,
        values: Vec::new(),
        indices: Vec::new(),
    };
    if nq == 0 || nk == 0 || (k == 0 && owners.is_none()) {
        // No rows on one side (then no keys have owners), or nothing asked
        // for: every list is empty.
        return Ok((empty(k_keys), owners.map(|_| Vec::new())));
    }
    let nq4 = nq.next_multiple_of(4);
    let window = gpu.window_bytes(16 * dim as u64);
    let limit = if owners.is_some() {
        // Every query in one block: as large as a binding allows.
        ensure!(
            16 * nq4 as u64 <= window,
            "rank: {nq} queries do not fit one block of scores ({} MiB bound at once)",
            window >> 20
        );
        window.min(BLOCK_BYTES.max(16 * nq4 as u64))
    } else {
        window.min(BLOCK_BYTES)
    };
    // Key chunks: as many rows as one binding holds, as a score row of a
    // block of 4 queries (a multiple of 4); with positions, of every query.
    let per_key = 4 * if owners.is_some() { nq4 } else { 4 } as u64;
    let chunk = ((limit / (4 * dim as u64)).min(limit / per_key) as usize / 4 * 4).max(4);
    let chunks: Vec<(usize, usize)> = (0..nk)
        .step_by(chunk)
        .map(|s| (s, chunk.min(nk - s)))
        .collect();
    let mut parts: Vec<Ranking> = Vec::with_capacity(chunks.len());
    let mut positions: Vec<u32> = Vec::with_capacity(if owners.is_some() { nk } else { 0 });
    for &(k0, kn) in &chunks {
        let kpad = kn.next_multiple_of(4);
        let mut kdata = keys[k0 * dim..(k0 + kn) * dim].to_vec();
        kdata.resize(kpad * dim, 0.0);
        let kt = Tensor::from_slice(gpu, &kdata, &[kpad, dim])?;
        drop(kdata);
        // Queries per block: the scores fit the limit, one shape for all.
        let qb = ((limit / (4 * kpad as u64)) as usize / 4 * 4).clamp(4, nq4);
        let kc = k_keys.min(kn);
        let mut part = Ranking {
            k: kc,
            values: Vec::with_capacity(nq * kc),
            indices: Vec::with_capacity(nq * kc),
        };
        let mut qdata = vec![0.0f32; qb * dim];
        for q0 in (0..nq).step_by(qb) {
            let qn = qb.min(nq - q0);
            qdata[..qn * dim].copy_from_slice(&queries[q0 * dim..(q0 + qn) * dim]);
            qdata[qn * dim..].fill(0.0);
            let qt = Tensor::from_slice(gpu, &qdata, &[qb, dim])?;
            let s = gemm(&qt, &kt, None, Gemm::new(1, qb, kpad, dim).tb(true))?;
            // k = 0 with positions: only the positions.
            let best = if kc > 0 {
                Some(topk(&s, qn, kn, kpad, kc)?)
            } else {
                None
            };
            let pos = match owners {
                Some(o) => {
                    ensure!(qn == nq, "rank: a block of {qn} of {nq} queries");
                    let own =
                        Tensor::from_slice(gpu, bytemuck::cast_slice(&o[k0..k0 + kn]), &[kn])?;
                    Some(column_positions(&s, qn, kn, kpad, &own)?)
                }
                None => None,
            };
            if let Some((v, i)) = best {
                part.values.extend(v.to_vec()?);
                part.indices
                    .extend(indices_to_vec(&i)?.into_iter().map(|x| x + k0 as u32));
            }
            if let Some(p) = pos {
                positions.extend(&indices_to_vec(&p)?[..kn]);
            }
        }
        parts.push(part);
    }
    let forward = if parts.len() == 1 {
        parts.pop().unwrap()
    } else {
        merge(&parts, nq, k_keys)
    };
    Ok((forward, owners.map(|_| positions)))
}

/// The k best over per-chunk rankings of the same queries.
fn merge(parts: &[Ranking], nq: usize, k: usize) -> Ranking {
    let mut out = Ranking {
        k,
        values: Vec::with_capacity(nq * k),
        indices: Vec::with_capacity(nq * k),
    };
    let mut cand: Vec<(f32, u32)> = Vec::new();
    for q in 0..nq {
        cand.clear();
        for p in parts {
            cand.extend(
                p.row_values(q)
                    .iter()
                    .copied()
                    .zip(p.row(q).iter().copied()),
            );
        }
        cand.sort_by(|a, b| b.0.partial_cmp(&a.0).unwrap().then(a.1.cmp(&b.1)));
        for &(v, i) in &cand[..k] {
            out.values.push(v);
            out.indices.push(i);
        }
    }
    out
}

/// CPU reference of [`rank`]: f64 dot products, the same order.
pub fn rank_ref(queries: &[f32], keys: &[f32], dim: usize, k: usize) -> Ranking {
    let nk = keys.len() / dim;
    let k = k.min(nk);
    let mut out = Ranking {
        k,
        values: Vec::new(),
        indices: Vec::new(),
    };
    for q in queries.chunks(dim) {
        let s: Vec<f64> = keys
            .chunks(dim)
            .map(|key| q.iter().zip(key).map(|(a, b)| *a as f64 * *b as f64).sum())
            .collect();
        let mut order: Vec<u32> = (0..nk as u32).collect();
        order.sort_by(|&a, &b| {
            s[b as usize]
                .partial_cmp(&s[a as usize])
                .unwrap()
                .then(a.cmp(&b))
        });
        for &i in &order[..k] {
            out.values.push(s[i as usize] as f32);
            out.indices.push(i);
        }
    }
    out
}

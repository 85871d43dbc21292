//! Top-k of score rows (both layouts, one and several passes, ties) and
//! ranking by similarity (matmul + top-k, in blocks and key chunks) against
//! CPU references.
mod common;
use clip_wgpu::ops::layernorm::Rows;
use clip_wgpu::ops::positions::{column_positions, column_positions_ref};
use clip_wgpu::ops::topk::{
    indices_to_vec, rank, rank_ref, rank_with_positions, topk_columns, topk_ref, topk_with,
    Ranking, PASS_K,
};
use clip_wgpu::Tensor;
use common::*;

const LAYOUTS: [Rows; 2] = [Rows::Thread, Rows::Workgroup];

#[test]
fn topk_matches_reference_with_ties() {
    let Some(gpu) = gpu() else { return };
    let mut seed = 7;
    for (rows, cols) in [(1, 1), (3, 7), (5, 64), (9, 130), (40, 1000), (2, 3000)] {
        for k in [1, 5, 10, PASS_K, PASS_K + 1, 70, cols] {
            if k > cols {
                continue;
            }
            let mut r = Rng::new(seed);
            seed += 1;
            // Few distinct values: many ties, broken by the lower column.
            let levels = 1 + r.below(20);
            let stride = cols + r.below(3);
            let scores: Vec<f32> = (0..rows * stride)
                .map(|_| (r.below(levels) as f32 - 5.0) * 0.25)
                .collect();
            let dense: Vec<f32> = scores
                .chunks(stride)
                .flat_map(|row| row[..cols].to_vec())
                .collect();
            let (want_v, want_i) = topk_ref(&dense, cols, k);
            let t = Tensor::from_slice(&gpu, &scores, &[rows, stride]).unwrap();
            for layout in LAYOUTS {
                let (v, i) = topk_with(&t, rows, cols, stride, k, Some(layout)).unwrap();
                let what = format!("topk {layout:?} {rows}x{cols} (stride {stride}) k {k}");
                assert_eq!(indices_to_vec(&i).unwrap(), want_i, "{what}: indices");
                assert_eq!(v.to_vec().unwrap(), want_v, "{what}: values");
            }
        }
    }
}

#[test]
fn topk_of_distinct_scores() {
    let Some(gpu) = gpu() else { return };
    let mut r = Rng::new(99);
    let (rows, cols, k) = (33, 5001, 10);
    let scores: Vec<f32> = r.vec(rows * cols, 1.0).iter().map(|&x| x as f32).collect();
    let (want_v, want_i) = topk_ref(&scores, cols, k);
    let t = Tensor::from_slice(&gpu, &scores, &[rows, cols]).unwrap();
    for layout in LAYOUTS {
        let (v, i) = topk_with(&t, rows, cols, cols, k, Some(layout)).unwrap();
        assert_eq!(indices_to_vec(&i).unwrap(), want_i, "{layout:?}");
        assert_eq!(v.to_vec().unwrap(), want_v, "{layout:?}");
    }
}

#[test]
fn topk_of_columns_matches_reference() {
    let Some(gpu) = gpu() else { return };
    let mut seed = 300;
    for (rows, cols, stride) in [(1, 1, 4), (7, 3, 3), (50, 9, 12), (333, 41, 44)] {
        for k in [1, 4, 10, PASS_K + 3] {
            if k > rows {
                continue;
            }
            let mut r = Rng::new(seed);
            seed += 1;
            let levels = 2 + r.below(30);
            let scores: Vec<f32> = (0..rows * stride)
                .map(|_| r.below(levels) as f32 * 0.5 - 3.0)
                .collect();
            // The columns as rows, for the reference.
            let t: Vec<f32> = (0..cols)
                .flat_map(|c| (0..rows).map(move |row| (row, c)))
                .map(|(row, c)| scores[row * stride + c])
                .collect();
            let (want_v, want_i) = topk_ref(&t, rows, k);
            let st = Tensor::from_slice(&gpu, &scores, &[rows, stride]).unwrap();
            let (v, i) = topk_columns(&st, rows, cols, stride, k).unwrap();
            let what = format!("columns of {rows}x{cols} (stride {stride}) k {k}");
            assert_eq!(indices_to_vec(&i).unwrap(), want_i, "{what}");
            assert_eq!(v.to_vec().unwrap(), want_v, "{what}");
        }
    }
}

#[test]
fn column_positions_match_reference_with_ties() {
    let Some(gpu) = gpu() else { return };
    for (seed, (rows, cols, stride)) in (500..).zip([
        (1, 1, 4),
        (5, 3, 4),
        (9, 8, 8),
        (130, 37, 40),
        (1000, 21, 24),
    ]) {
        let mut r = Rng::new(seed);
        // Few distinct values: ties, broken by the lower row.
        let levels = 1 + r.below(12);
        let scores: Vec<f32> = (0..rows * stride)
            .map(|_| r.below(levels) as f32 * 0.5 - 2.0)
            .collect();
        let own: Vec<u32> = (0..cols).map(|_| r.below(rows) as u32).collect();
        let want = column_positions_ref(&scores, rows, cols, stride, &own);
        let st = Tensor::from_slice(&gpu, &scores, &[rows, stride]).unwrap();
        let ot = Tensor::from_slice(&gpu, bytemuck::cast_slice(&own), &[cols]).unwrap();
        let got = column_positions(&st, rows, cols, stride, &ot).unwrap();
        assert_eq!(
            indices_to_vec(&got).unwrap()[..cols],
            want[..],
            "positions in {rows}x{cols} (stride {stride})"
        );
    }
}

/// L2-normalised rows, as embeddings are.
fn embeddings(r: &mut Rng, n: usize, dim: usize) -> Vec<f32> {
    let mut v: Vec<f32> = r.vec(n * dim, 1.0).iter().map(|&x| x as f32).collect();
    for row in v.chunks_mut(dim) {
        let s = row.iter().map(|x| x * x).sum::<f32>().sqrt();
        row.iter_mut().for_each(|x| *x /= s);
    }
    v
}

fn check_rank(
    gpu: &std::sync::Arc<clip_wgpu::Gpu>,
    nq: usize,
    nk: usize,
    dim: usize,
    k: usize,
    seed: u64,
) {
    let mut r = Rng::new(seed);
    let q = embeddings(&mut r, nq, dim);
    let mut keys = embeddings(&mut r, nk, dim);
    // Exact duplicates among the keys: equal scores, the lower index first.
    if nk > 4 {
        let (a, b) = (nk / 3, nk - 2);
        let row = keys[a * dim..(a + 1) * dim].to_vec();
        keys[b * dim..(b + 1) * dim].copy_from_slice(&row);
    }
    let got = rank(gpu, &q, &keys, dim, k).unwrap();
    let what = format!("rank {nq} queries x {nk} keys, dim {dim}, k {k}");
    let dups = (nk > 4).then_some(((nk / 3) as u32, (nk - 2) as u32));
    same_ranking(&got, &q, &keys, dim, k, dups, &what);
    // With each key's own query's position, from the same product: each
    // key owned by a query in turn (several keys a query, as captions).
    let owners: Vec<u32> = (0..nk).map(|t| ((t * 7 + 3) % nq) as u32).collect();
    let (fwd, pos) = rank_with_positions(gpu, &q, &keys, dim, k, &owners).unwrap();
    assert_eq!(fwd, got, "{what}: rank_with_positions' ranking");
    same_positions(&pos, &q, &keys, dim, &owners, &what);
    // The positions alone (k = 0): the same.
    let (none, alone) = rank_with_positions(gpu, &q, &keys, dim, 0, &owners).unwrap();
    assert!(
        none.k == 0 && none.indices.is_empty(),
        "{what}: k = 0 ranks nothing"
    );
    assert_eq!(alone, pos, "{what}: the positions with k = 0");
}

/// `got[t]` is how many queries rank before query `owners[t]` for key t,
/// as the CPU counts in f64, but for queries within f32 rounding of it.
fn same_positions(got: &[u32], q: &[f32], keys: &[f32], dim: usize, owners: &[u32], what: &str) {
    let dot =
        |a: &[f32], b: &[f32]| -> f64 { a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum() };
    assert_eq!(got.len(), owners.len(), "{what}: positions");
    let mut near = 0;
    for (t, key) in keys.chunks(dim).enumerate() {
        let o = owners[t] as usize;
        let own = dot(&q[o * dim..(o + 1) * dim], key);
        let (mut sure, mut close) = (0, 0);
        for (i, row) in q.chunks(dim).enumerate() {
            let d = dot(row, key) - own;
            if i != o && d.abs() < 1e-6 {
                close += 1;
            } else if d > 0.0 || (d == 0.0 && i < o) {
                sure += 1;
            }
        }
        near += close;
        let p = got[t];
        assert!(
            p >= sure && p <= sure + close,
            "{what}: key {t}'s own query {o} at position {p}, the CPU counts {sure} before it (+{close} within rounding)"
        );
    }
    eprintln!("{what}: positions as the CPU's, {near} near ties");
}

/// `got` ranks `keys` for each of `q` as the CPU does.
/// `dups`: two keys that are equal (the lower must rank first).
fn same_ranking(
    got: &Ranking,
    q: &[f32],
    keys: &[f32],
    dim: usize,
    k: usize,
    dups: Option<(u32, u32)>,
    what: &str,
) {
    let nq = q.len() / dim;
    let want = rank_ref(q, keys, dim, k);
    assert_eq!(got.k, want.k, "{what}");
    let exact = |qi: usize, key: u32| -> f64 {
        let key = key as usize;
        q[qi * dim..(qi + 1) * dim]
            .iter()
            .zip(&keys[key * dim..(key + 1) * dim])
            .map(|(a, b)| *a as f64 * *b as f64)
            .sum()
    };
    let mut differ = 0;
    for qi in 0..nq {
        let (g, w) = (got.row(qi), want.row(qi));
        for (pos, (&a, &b)) in g.iter().zip(w).enumerate() {
            // Another key only where the two tie within f32 rounding.
            if a != b {
                differ += 1;
                let gap = (exact(qi, a) - exact(qi, b)).abs();
                assert!(gap < 1e-6, "{what}: query {qi}, place {pos}: key {a}, the CPU ranks {b} there ({gap:.2e} apart)");
            }
        }
        let mut sorted = g.to_vec();
        sorted.sort();
        sorted.dedup();
        assert_eq!(sorted.len(), g.len(), "{what}: a key twice");
        // Exact duplicates: the lower index first.
        if let Some((a, b)) = dups {
            if let (Some(pa), Some(pb)) = (
                g.iter().position(|&x| x == a),
                g.iter().position(|&x| x == b),
            ) {
                assert!(pa < pb, "{what}: equal keys out of index order");
            }
        }
    }
    let e = got
        .values
        .iter()
        .zip(&want.values)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    eprintln!(
        "{what}: similarities within {e:.2e}, {differ} places hold another key of a near tie"
    );
    assert!(e < 1e-5, "{what}: similarities differ by {e:.2e}");
}

#[test]
fn rank_matches_cpu_ranking() {
    let Some(gpu) = own_gpu() else { return };
    check_rank(&gpu, 1, 1, 8, 10, 1);
    check_rank(&gpu, 7, 13, 5, 3, 2);
    check_rank(&gpu, 120, 601, 32, 10, 3);
    check_rank(&gpu, 50, 2003, 128, 40, 4);
    check_rank(&gpu, 3, 300, 16, 300, 5);
}

#[test]
fn rank_in_key_chunks_matches_cpu_ranking() {
    // A small binding limit: the keys are ranked in several chunks whose
    // best are merged, and the queries in several blocks.
    let Some(gpu) = own_gpu() else { return };
    gpu.set_binding_limit(4096);
    check_rank(&gpu, 30, 1001, 16, 10, 6);
    check_rank(&gpu, 9, 257, 16, 70, 7);
}

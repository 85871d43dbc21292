// CLIP's contrastive loss (as loss.wgsl) for a batch whose N x N logits are
// too large to hold (accumulated batches of many thousands): the logits are
// made a block of R text rows at a time, Zb = T[r0..r0+R] I^T ([R, N],
// unscaled; the scale exp(s) is applied on the fly), and never kept.
// Forward, per block: the rows' log-sum-exps and diagonal, and each
// column's log-sum-exp over the block's rows; then the columns' partials
// are merged and the loss summed. Backward, per block (Zb made again):
//   dZ_ij = g (softmax_row(Z)_ij + softmax_col(Z)_ij - 2 [i = j]) / (2N)
//   dM = exp(s) dZ (the block's rows of d(T I^T))
//   part[b, j] = sum over the block's rows of dZ_ij Z_ij (ds, summed by reduce.rs)
// Entry points use binding prefixes of one list: finish_loss {1},
// finish_cols {1,2}, block_lse {1..4}, block_dlogits {1..6}. No atomics;
// every sum runs in a fixed order.

struct Params { n: u32, r0: u32, rows: u32, b: u32 }

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read_write> stats: array<f32>;   // lse rows [N] | lse cols [N] | diag [N] | loss
@group(0) @binding(2) var<storage, read_write> blk: array<f32>;     // per block: column lse (forward) or ds partials (backward), [blocks, N]
@group(0) @binding(3) var<storage, read> scale: array<f32>;         // s (log space), [1]
@group(0) @binding(4) var<storage, read> zb: array<f32>;            // T_b I^T, [rows, N]
@group(0) @binding(5) var<storage, read> dy: array<f32>;            // upstream gradient, [1]
@group(0) @binding(6) var<storage, read_write> dm: array<f32>;      // d(T I^T) of the block's rows, [rows, N]

fn index(gid: vec3<u32>, nwg: vec3<u32>) -> u32 { return gid.x + gid.y * nwg.x * 256u; }

// Thread k < rows: log-sum-exp of block row k (text r0 + k) and its
// diagonal logit; rows <= k < rows + N: log-sum-exp of column k - rows over
// the block's rows, into blk[b, column].
@compute @workgroup_size(256, 1, 1)
fn block_lse(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let k = index(gid, nwg);
    let n = p.n;
    let rows = p.rows;
    if k >= rows + n { return; }
    let sc = exp(scale[0]);
    var base: u32;
    var stride: u32;
    var len: u32;
    if k < rows {
        base = k * n;
        stride = 1u;
        len = n;
    } else {
        base = k - rows;
        stride = n;
        len = rows;
    }
    var m = -3.4028235e38;
    for (var j = 0u; j < len; j++) { m = max(m, sc * zb[base + j * stride]); }
    var s = 0.0;
    for (var j = 0u; j < len; j++) { s += exp(sc * zb[base + j * stride] - m); }
    if k < rows {
        stats[p.r0 + k] = m + log(s);
        stats[2u * n + p.r0 + k] = sc * zb[k * n + p.r0 + k];
    } else {
        blk[p.b * n + k - rows] = m + log(s);
    }
}

// Thread j: column j's log-sum-exp from its p.b block partials.
@compute @workgroup_size(256, 1, 1)
fn finish_cols(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let j = index(gid, nwg);
    let n = p.n;
    if j >= n { return; }
    var m = -3.4028235e38;
    for (var b = 0u; b < p.b; b++) { m = max(m, blk[b * n + j]); }
    var s = 0.0;
    for (var b = 0u; b < p.b; b++) { s += exp(blk[b * n + j] - m); }
    stats[n + j] = m + log(s);
}

// One workgroup: loss = sum_k (lse_row_k + lse_col_k - 2 z_kk) / (2N),
// strided per thread and then a fixed tree (deterministic).
var<workgroup> acc: array<f32, 256>;

@compute @workgroup_size(256, 1, 1)
fn finish_loss(@builtin(local_invocation_id) lid: vec3<u32>) {
    let n = p.n;
    let t = lid.x;
    var s = 0.0;
    for (var k = t; k < n; k += 256u) {
        s += stats[k] + stats[n + k] - 2.0 * stats[2u * n + k];
    }
    acc[t] = s;
    workgroupBarrier();
    for (var w = 128u; w > 0u; w >>= 1u) {
        if t < w { acc[t] += acc[t + w]; }
        workgroupBarrier();
    }
    if t == 0u { stats[3u * n] = acc[0] / f32(2u * n); }
}

// Thread j (a column): dM for the block's rows of column j, and
// blk[b, j] = sum over those rows of dZ_ij Z_ij, in row order.
@compute @workgroup_size(64, 1, 1)
fn block_dlogits(@builtin(global_invocation_id) gid: vec3<u32>) {
    let n = p.n;
    let j = gid.x;
    if j >= n { return; }
    let sc = exp(scale[0]);
    let g = dy[0] / f32(2u * n);
    let lc = stats[n + j];
    var a = 0.0;
    for (var r = 0u; r < p.rows; r++) {
        let i = p.r0 + r;
        let zij = sc * zb[r * n + j];
        var d = exp(zij - stats[i]) + exp(zij - lc);
        if i == j { d -= 2.0; }
        let dz = g * d;
        dm[r * n + j] = sc * dz;
        a += dz * zij;
    }
    blk[p.b * n + j] = a;
}

// CLIP contrastive loss on logits Z = exp(s) * T I^T [N, N] (row i: text i,
// column j: image j), as transformers' clip_loss:
//   loss = (CE over the rows of Z + CE over its columns) / 2, target = diagonal,
// with mean-reduced cross entropy computed stably as logsumexp - z_ii.
// Backward, with g the upstream gradient (read from dy, no readback):
//   dZ_ij = g (softmax_row(Z)_ij + softmax_col(Z)_ij - 2 [i = j]) / (2N)
//   dM = exp(s) dZ (gradient of T I^T, fed to gemm for dT and dI)
//   ds = sum_ij dZ_ij Z_ij (per column and row chunk here, summed by reduce.rs)
// Entry points use binding prefixes of one list: lse/loss {1,2,3}, scale
// {1,2}, dlogits {1..6}. No atomics; every sum runs in a fixed order.

struct Params { n: u32, chunk: u32, _a: u32, _b: u32 }

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> scale: array<f32>;         // s (log space), [1]
@group(0) @binding(2) var<storage, read_write> z: array<f32>;       // logits [N, N]
@group(0) @binding(3) var<storage, read_write> stats: array<f32>;   // lse rows [N] | lse cols [N] | loss
@group(0) @binding(4) var<storage, read> dy: array<f32>;            // upstream gradient, [1]
@group(0) @binding(5) var<storage, read_write> dm: array<f32>;      // d(T I^T) [N, N]
@group(0) @binding(6) var<storage, read_write> part: array<f32>;    // ds partials [chunks, N]

fn index(gid: vec3<u32>, nwg: vec3<u32>) -> u32 { return gid.x + gid.y * nwg.x * 256u; }

// Runs before `scale`: z still holds T I^T, scaled here on the fly exactly
// as `scale` will store it. Thread k < N: logsumexp of row k; N <= k < 2N:
// of column k - N.
@compute @workgroup_size(256, 1, 1)
fn lse(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let k = index(gid, nwg);
    let n = p.n;
    if k >= 2u * n { return; }
    let sc = exp(scale[0]);
    var base: u32;
    var stride: u32;
    if k < n {
        base = k * n;
        stride = 1u;
    } else {
        base = k - n;
        stride = n;
    }
    var m = -3.4028235e38;
    for (var j = 0u; j < n; j++) { m = max(m, sc * z[base + j * stride]); }
    var s = 0.0;
    for (var j = 0u; j < n; j++) { s += exp(sc * z[base + j * stride] - m); }
    stats[k] = m + log(s);
}

// One workgroup: loss = sum_k (lse_k - z_kk) / (2N), strided per thread and
// then a fixed tree (deterministic).
var<workgroup> acc: array<f32, 256>;

@compute @workgroup_size(256, 1, 1)
fn loss(@builtin(local_invocation_id) lid: vec3<u32>) {
    let n = p.n;
    let sc = exp(scale[0]);
    let t = lid.x;
    var s = 0.0;
    for (var k = t; k < 2u * n; k += 256u) {
        let i = k % n;
        s += stats[k] - sc * z[i * (n + 1u)];
    }
    acc[t] = s;
    workgroupBarrier();
    for (var w = 128u; w > 0u; w >>= 1u) {
        if t < w { acc[t] += acc[t + w]; }
        workgroupBarrier();
    }
    if t == 0u { stats[2u * n] = acc[0] / f32(2u * n); }
}

// z = exp(s) * z in place (the logits the caller sees, and the backward reads).
@compute @workgroup_size(256, 1, 1)
fn scale_logits(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = index(gid, nwg);
    if i >= p.n * p.n { return; }
    z[i] = exp(scale[0]) * z[i];
}

// Thread (column j, row chunk c): dM for rows c*chunk .. of column j, and
// part[c, j] = sum over those rows of dZ_ij Z_ij, in row order.
@compute @workgroup_size(64, 1, 1)
fn dlogits(@builtin(global_invocation_id) gid: vec3<u32>) {
    let n = p.n;
    let j = gid.x;
    let c = gid.y;
    if j >= n { return; }
    let sc = exp(scale[0]);
    let g = dy[0] / f32(2u * n);
    let lc = stats[n + j];
    let r1 = min((c + 1u) * p.chunk, n);
    var a = 0.0;
    for (var i = c * p.chunk; i < r1; i++) {
        let zij = z[i * n + j];
        var d = exp(zij - stats[i]) + exp(zij - lc);
        if i == j { d -= 2.0; }
        let dz = g * d;
        dm[i * n + j] = sc * dz;
        a += dz * zij;
    }
    part[c * n + j] = a;
}

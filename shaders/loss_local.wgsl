// One rank's half of OpenCLIP's local loss: rows a [n, E] (this rank's
// image or text embeddings) against every rank's other side b [N, E], row
// k's label being column off + k:
//   loss = sum_k (lse_j(sc Z_kj) - sc Z_k,off+k) / denom,  Z = A B^T, sc = exp(s).
// Made a block of R rows of a at a time, Zb = A[r0..r0+R] B^T ([R, N]).
// Forward, per block: each row's log-sum-exp and labelled logit; then the
// loss summed in a fixed order. Backward, per block (Zb made again):
//   dZ_kj = g (softmax(Z_k)_j - [j = off + k]),  g = dy / denom
//   dM = sc dZ (d(A_b B^T)),  blk[b, j] = sum over the block's rows of dZ_kj sc Z_kj
// Entry points use binding prefixes of one list: finish {1}, row_lse
// {1..3}, row_dlogits {1..6}.

struct Params { n: u32, r0: u32, rows: u32, b: u32, off: u32, total: u32, denom: f32, pad: u32 }

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read_write> stats: array<f32>;   // lse [rows_all] | labelled logit [rows_all] | loss
@group(0) @binding(2) var<storage, read> zb: array<f32>;            // A_b B^T, [rows, N]
@group(0) @binding(3) var<storage, read> scale: array<f32>;         // s (log space), [1]
@group(0) @binding(4) var<storage, read_write> blk: array<f32>;     // ds partials, [blocks, N]
@group(0) @binding(5) var<storage, read> dy: array<f32>;            // upstream gradient, [1]
@group(0) @binding(6) var<storage, read_write> dm: array<f32>;      // d(A_b B^T), [rows, N]

// Thread k < rows: log-sum-exp of block row k (row r0 + k of a) and its
// labelled logit. p.total is the number of rows of a.
@compute @workgroup_size(64, 1, 1)
fn row_lse(@builtin(global_invocation_id) gid: vec3<u32>) {
    let k = gid.x;
    let n = p.n;
    if k >= p.rows { return; }
    let sc = exp(scale[0]);
    var m = -3.4028235e38;
    for (var j = 0u; j < n; j++) { m = max(m, sc * zb[k * n + j]); }
    var s = 0.0;
    for (var j = 0u; j < n; j++) { s += exp(sc * zb[k * n + j] - m); }
    stats[p.r0 + k] = m + log(s);
    stats[p.total + p.r0 + k] = sc * zb[k * n + p.off + p.r0 + k];
}

// One workgroup: loss = sum_k (lse_k - labelled_k) / denom, strided per
// thread and then a fixed tree (deterministic).
var<workgroup> acc: array<f32, 256>;

@compute @workgroup_size(256, 1, 1)
fn finish(@builtin(local_invocation_id) lid: vec3<u32>) {
    let rows = p.total;
    let t = lid.x;
    var s = 0.0;
    for (var k = t; k < rows; k += 256u) {
        s += stats[k] - stats[rows + k];
    }
    acc[t] = s;
    workgroupBarrier();
    for (var w = 128u; w > 0u; w >>= 1u) {
        if t < w { acc[t] += acc[t + w]; }
        workgroupBarrier();
    }
    if t == 0u { stats[2u * rows] = acc[0] / p.denom; }
}

// Thread j (a column of b): dM for the block's rows at column j, and
// blk[b, j] = sum over those rows of dZ_kj sc Z_kj, in row order.
@compute @workgroup_size(64, 1, 1)
fn row_dlogits(@builtin(global_invocation_id) gid: vec3<u32>) {
    let n = p.n;
    let j = gid.x;
    if j >= n { return; }
    let sc = exp(scale[0]);
    let g = dy[0] / p.denom;
    var a = 0.0;
    for (var r = 0u; r < p.rows; r++) {
        let k = p.r0 + r;
        let z = sc * zb[r * n + j];
        var d = exp(z - stats[k]);
        if j == p.off + k { d -= 1.0; }
        let dz = g * d;
        dm[r * n + j] = sc * dz;
        a += dz * z;
    }
    blk[p.b * n + j] = a;
}

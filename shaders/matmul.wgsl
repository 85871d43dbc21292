// Batched matmul: C[b] = alpha * op(A[b]) * op(B[b]) (+ bias[j]) (+ C[b] when accumulating).
// op() transposes when TRANS_A / TRANS_B are set (pipeline constants, so the
// compiler sees constant strides). Backward passes reuse this kernel:
// dA = dC op(B)^T, dB = op(A)^T dC, dbias = column sums of dC (reduce.wgsl).

struct Params {
    m: u32, n: u32, k: u32, lda: u32,
    ldb: u32, ldc: u32, a_bs: u32, b_bs: u32,
    c_bs: u32, has_bias: u32, accumulate: u32, alpha: f32,
}

override TRANS_A: bool = false;
override TRANS_B: bool = false;

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> a: array<f32>;
@group(0) @binding(2) var<storage, read> b: array<f32>;
@group(0) @binding(3) var<storage, read> bias: array<f32>;
@group(0) @binding(4) var<storage, read_write> c: array<f32>;

fn a_at(base: u32, i: u32, kk: u32) -> f32 {
    if TRANS_A { return a[base + kk * p.lda + i]; }
    return a[base + i * p.lda + kk];
}

fn b_at(base: u32, kk: u32, j: u32) -> f32 {
    if TRANS_B { return b[base + j * p.ldb + kk]; }
    return b[base + kk * p.ldb + j];
}

fn store(base: u32, i: u32, j: u32, v: f32) {
    if i >= p.m || j >= p.n { return; }
    var out = p.alpha * v;
    if p.has_bias != 0u { out += bias[j]; }
    let idx = base + i * p.ldc + j;
    if p.accumulate != 0u { out += c[idx]; }
    c[idx] = out;
}

// ---- register-blocked, no workgroup memory (CPU adapters such as lavapipe) ----
// An 8x8 workgroup covers a (8*RM) x (8*RN) tile. Thread (tx, ty) owns rows
// ty*RM + r and columns tx + 8*c: the 8 lanes of one SIMD row share the A
// value (a broadcast) and read 8 consecutive B values (one vector load).
const RM: u32 = 4u;
const RN: u32 = 4u;

@compute @workgroup_size(8, 8, 1)
fn matmul_regs(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let batch = wid.z;
    let row0 = wid.y * 8u * RM + lid.y * RM;
    let col0 = wid.x * 8u * RN + lid.x;
    let abase = batch * p.a_bs;
    let bbase = batch * p.b_bs;
    // Clamp out-of-range rows/columns to a valid one so the k loop has no
    // branches; their results are dropped at the store.
    var ri: array<u32, RM>;
    var cj: array<u32, RN>;
    for (var r = 0u; r < RM; r++) { ri[r] = min(row0 + r, p.m - 1u); }
    for (var q = 0u; q < RN; q++) { cj[q] = min(col0 + 8u * q, p.n - 1u); }
    var acc: array<f32, RM * RN>;
    for (var kk = 0u; kk < p.k; kk++) {
        var av: array<f32, RM>;
        var bv: array<f32, RN>;
        for (var r = 0u; r < RM; r++) { av[r] = a_at(abase, ri[r], kk); }
        for (var q = 0u; q < RN; q++) { bv[q] = b_at(bbase, kk, cj[q]); }
        for (var r = 0u; r < RM; r++) {
            for (var q = 0u; q < RN; q++) {
                acc[r * RN + q] = fma(av[r], bv[q], acc[r * RN + q]);
            }
        }
    }
    let cbase = batch * p.c_bs;
    for (var r = 0u; r < RM; r++) {
        for (var q = 0u; q < RN; q++) {
            store(cbase, row0 + r, col0 + 8u * q, acc[r * RN + q]);
        }
    }
}

// ---- workgroup-memory tiles (discrete/integrated GPUs) ----
// A 16x16 workgroup computes a 64x64 tile, 4x4 outputs per thread, staging
// 64x16 slices of A and B through workgroup memory.
const TS: u32 = 64u;
const TK: u32 = 16u;
var<workgroup> sa: array<f32, 1024>; // TK * TS, k-major
var<workgroup> sb: array<f32, 1024>; // TK * TS, k-major

@compute @workgroup_size(16, 16, 1)
fn matmul_tiled(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>,
                @builtin(local_invocation_index) li: u32) {
    let batch = wid.z;
    let tile_i = wid.y * TS;
    let tile_j = wid.x * TS;
    let abase = batch * p.a_bs;
    let bbase = batch * p.b_bs;
    var acc: array<f32, 16>;
    for (var k0 = 0u; k0 < p.k; k0 += TK) {
        // 256 threads load 1024 values of each tile: 4 each.
        for (var e = 0u; e < 4u; e++) {
            let idx = li + 256u * e;
            let kk = idx / TS;
            let x = idx % TS;
            let gk = k0 + kk;
            var va = 0.0;
            if gk < p.k && tile_i + x < p.m { va = a_at(abase, tile_i + x, gk); }
            sa[kk * TS + x] = va;
            var vb = 0.0;
            if gk < p.k && tile_j + x < p.n { vb = b_at(bbase, gk, tile_j + x); }
            sb[kk * TS + x] = vb;
        }
        workgroupBarrier();
        for (var kk = 0u; kk < TK; kk++) {
            var av: array<f32, 4>;
            var bv: array<f32, 4>;
            for (var r = 0u; r < 4u; r++) { av[r] = sa[kk * TS + lid.y + 16u * r]; }
            for (var q = 0u; q < 4u; q++) { bv[q] = sb[kk * TS + lid.x + 16u * q]; }
            for (var r = 0u; r < 4u; r++) {
                for (var q = 0u; q < 4u; q++) {
                    acc[r * 4u + q] = fma(av[r], bv[q], acc[r * 4u + q]);
                }
            }
        }
        workgroupBarrier();
    }
    let cbase = batch * p.c_bs;
    for (var r = 0u; r < 4u; r++) {
        for (var q = 0u; q < 4u; q++) {
            store(cbase, tile_i + lid.y + 16u * r, tile_j + lid.x + 16u * q, acc[r * 4u + q]);
        }
    }
}

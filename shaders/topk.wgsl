// The k best entries of each row of a score matrix, best first: higher
// score first, and among equal scores the lower column first (so the order
// is total and the result does not depend on thread timing). Scores must be
// finite (the caller checks; WGSL does not promise NaN comparisons).
//
// One pass finds up to KMAX entries. Larger k runs several passes: pass p
// writes columns [off, off + k) of each output row and takes only entries
// that rank after the one pass p - 1 wrote last (out[off - 1]), so the
// passes continue the same ranking where the previous one stopped.
//
// Two layouts as the other row kernels (layernorm.wgsl): *_row (thread per
// row: CPU adapters, no barriers) and *_wg (64-thread workgroup per row,
// coalesced loads: GPUs), whose threads each keep the best of a strided
// share of the row and merge them k times by a tree reduction.
//
//   topk_*: scores (row r's column c at r * stride + c * cstride: cstride
//           1 for rows of a matrix, the row length for its columns),
//           values (out) [rows, out_k], indices (out, u32) [rows, out_k]

struct Params { rows: u32, cols: u32, stride: u32, k: u32, out_k: u32, off: u32, cstride: u32, _b: u32 }

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> scores: array<f32>;
@group(0) @binding(2) var<storage, read_write> values: array<f32>;
@group(0) @binding(3) var<storage, read_write> indices: array<u32>;

const KMAX: u32 = 32u;
const WG: u32 = 64u;
const NONE: u32 = 0xffffffffu;

// (v, i) ranks before (w, j).
fn before(v: f32, i: u32, w: f32, j: u32) -> bool {
    return v > w || (v == w && i < j);
}

// This thread's best of columns c0, c0 + step, ... (ascending), after the
// floor (fv, fi) when `floored`: (count, values, indices), best first.
struct Local { n: u32, v: array<f32, KMAX>, i: array<u32, KMAX> }

fn scan(base: u32, c0: u32, step: u32, floored: bool, fv: f32, fi: u32) -> Local {
    var l: Local;
    l.n = 0u;
    let k = p.k;
    for (var c = c0; c < p.cols; c += step) {
        let v = scores[base + c * p.cstride];
        if floored && !before(fv, fi, v, c) { continue; }
        // Columns come in ascending order: an equal score ranks after the
        // ones kept already.
        if l.n == k && !(v > l.v[k - 1u]) { continue; }
        var j = min(l.n, k - 1u);
        while j > 0u && v > l.v[j - 1u] {
            l.v[j] = l.v[j - 1u];
            l.i[j] = l.i[j - 1u];
            j -= 1u;
        }
        l.v[j] = v;
        l.i[j] = c;
        l.n = min(l.n + 1u, k);
    }
    return l;
}

@compute @workgroup_size(256, 1, 1)
fn topk_row(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let row = gid.x + gid.y * nwg.x * 256u;
    if row >= p.rows { return; }
    let o = row * p.out_k + p.off;
    let floored = p.off > 0u;
    var fv = 0.0;
    var fi = 0u;
    if floored { fv = values[o - 1u]; fi = indices[o - 1u]; }
    let l = scan(row * p.stride, 0u, 1u, floored, fv, fi);
    for (var r = 0u; r < p.k; r++) {
        if r < l.n {
            values[o + r] = l.v[r];
            indices[o + r] = l.i[r];
        } else {
            values[o + r] = 0.0;
            indices[o + r] = NONE;
        }
    }
}

var<workgroup> red_v: array<f32, WG>;
var<workgroup> red_i: array<u32, WG>;

@compute @workgroup_size(64, 1, 1)
fn topk_wg(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
           @builtin(local_invocation_index) lid: u32) {
    let row = wid.x + wid.y * nwg.x;
    // Uniform per workgroup: every thread returns together.
    if row >= p.rows { return; }
    let o = row * p.out_k + p.off;
    let floored = p.off > 0u;
    var fv = 0.0;
    var fi = 0u;
    if floored { fv = values[o - 1u]; fi = indices[o - 1u]; }
    let l = scan(row * p.stride, lid, WG, floored, fv, fi);
    var h = 0u;
    for (var r = 0u; r < p.k; r++) {
        if h < l.n {
            red_v[lid] = l.v[h];
            red_i[lid] = l.i[h];
        } else {
            red_v[lid] = 0.0;
            red_i[lid] = NONE;
        }
        workgroupBarrier();
        for (var s = WG / 2u; s > 0u; s >>= 1u) {
            if lid < s {
                let j = red_i[lid + s];
                if j != NONE && (red_i[lid] == NONE || before(red_v[lid + s], j, red_v[lid], red_i[lid])) {
                    red_v[lid] = red_v[lid + s];
                    red_i[lid] = j;
                }
            }
            workgroupBarrier();
        }
        let bv = red_v[0];
        let bi = red_i[0];
        if lid == 0u {
            values[o + r] = bv;
            indices[o + r] = bi;
        }
        // Column indices are unique: exactly one thread's head won.
        if bi != NONE && h < l.n && l.i[h] == bi { h += 1u; }
        workgroupBarrier();
    }
}

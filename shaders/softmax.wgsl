// Row softmax of attention scores [B, H, Tq, Tk] with an optional causal mask
// (key j > query i is masked) and an optional key-padding mask
// key_valid [B, Tk] (1 keep, 0 mask). Max-subtracted; masked entries get
// probability exactly 0, and a row with every key masked is all zeros.
// Backward: dS = P * (dP - sum_j dP * P); masked entries have P = 0, so
// they get 0 without looking at the mask.
// Row kernels in two layouts as in layernorm.wgsl: *_wg (64-thread
// workgroup per row, fixed tree reductions: GPUs) and *_row (thread per
// row: CPU adapters).
//
//   forward_*:  scores, P (out),  key_valid (dummy unless has_kv)
//   backward_*: dP,     dS (out), P

// keys: keys j >= keys are masked (sequence padding), 0 = none.
struct Params { rows: u32, tk: u32, tq: u32, heads: u32, causal: u32, has_kv: u32, keys: u32, _b: u32 }

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> src: array<f32>;
@group(0) @binding(2) var<storage, read_write> dst: array<f32>;
@group(0) @binding(3) var<storage, read> aux: array<f32>;

const WG: u32 = 64u;
const NEG_MAX: f32 = -3.40282347e38;
var<workgroup> red: array<f32, WG>;

fn wg_sum(lid: u32, v: f32) -> f32 {
    red[lid] = v;
    workgroupBarrier();
    for (var off = WG / 2u; off > 0u; off >>= 1u) {
        if lid < off { red[lid] += red[lid + off]; }
        workgroupBarrier();
    }
    let s = red[0];
    workgroupBarrier();
    return s;
}

fn wg_max(lid: u32, v: f32) -> f32 {
    red[lid] = v;
    workgroupBarrier();
    for (var off = WG / 2u; off > 0u; off >>= 1u) {
        if lid < off { red[lid] = max(red[lid], red[lid + off]); }
        workgroupBarrier();
    }
    let s = red[0];
    workgroupBarrier();
    return s;
}

// Whether query row `row` may attend to key j.
fn keep(row: u32, j: u32) -> bool {
    var ok = (p.causal == 0u || j <= row % p.tq) && (p.keys == 0u || j < p.keys);
    if p.has_kv != 0u {
        let b = row / (p.tq * p.heads);
        ok = ok && aux[b * p.tk + j] != 0.0;
    }
    return ok;
}

@compute @workgroup_size(64, 1, 1)
fn forward_wg(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
              @builtin(local_invocation_index) lid: u32) {
    let row = wid.x + wid.y * nwg.x;
    if row >= p.rows { return; }
    let base = row * p.tk;
    var m = NEG_MAX;
    for (var j = lid; j < p.tk; j += WG) {
        if keep(row, j) { m = max(m, src[base + j]); }
    }
    m = wg_max(lid, m);
    var s = 0.0;
    for (var j = lid; j < p.tk; j += WG) {
        if keep(row, j) { s += exp(src[base + j] - m); }
    }
    // s >= 1 (the max contributes exp(0)) unless every key is masked, and
    // then nothing below divides by it.
    s = wg_sum(lid, s);
    for (var j = lid; j < p.tk; j += WG) {
        var v = 0.0;
        if keep(row, j) { v = exp(src[base + j] - m) / s; }
        dst[base + j] = v;
    }
}

@compute @workgroup_size(256, 1, 1)
fn forward_row(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let row = gid.x + gid.y * nwg.x * 256u;
    if row >= p.rows { return; }
    let base = row * p.tk;
    var m = NEG_MAX;
    for (var j = 0u; j < p.tk; j++) {
        if keep(row, j) { m = max(m, src[base + j]); }
    }
    var s = 0.0;
    for (var j = 0u; j < p.tk; j++) {
        if keep(row, j) { s += exp(src[base + j] - m); }
    }
    for (var j = 0u; j < p.tk; j++) {
        var v = 0.0;
        if keep(row, j) { v = exp(src[base + j] - m) / s; }
        dst[base + j] = v;
    }
}

@compute @workgroup_size(64, 1, 1)
fn backward_wg(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
               @builtin(local_invocation_index) lid: u32) {
    let row = wid.x + wid.y * nwg.x;
    if row >= p.rows { return; }
    let base = row * p.tk;
    var d = 0.0;
    for (var j = lid; j < p.tk; j += WG) { d = fma(src[base + j], aux[base + j], d); }
    d = wg_sum(lid, d);
    for (var j = lid; j < p.tk; j += WG) { dst[base + j] = aux[base + j] * (src[base + j] - d); }
}

@compute @workgroup_size(256, 1, 1)
fn backward_row(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let row = gid.x + gid.y * nwg.x * 256u;
    if row >= p.rows { return; }
    let base = row * p.tk;
    var d = 0.0;
    for (var j = 0u; j < p.tk; j++) { d = fma(src[base + j], aux[base + j], d); }
    for (var j = 0u; j < p.tk; j++) { dst[base + j] = aux[base + j] * (src[base + j] - d); }
}

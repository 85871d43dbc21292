// y = x / ||x||_2 per row of the last dimension, with no epsilon (as
// transformers' CLIP does: embeds / embeds.norm(dim=-1, keepdim=True)).
// Backward: dx = (dy - y (y . dy)) / ||x||.
// Row kernels in two layouts as in layernorm.wgsl: *_wg (64-thread
// workgroup per row: GPUs) and *_row (thread per row: CPU adapters).
//
//   forward_*:  x,  y (out),  norm (out)
//   backward_*: dy, dx (out), norm,       y

struct Params { rows: u32, cols: u32, _a: u32, _b: u32 }

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> src: array<f32>;
@group(0) @binding(2) var<storage, read_write> dst: array<f32>;
@group(0) @binding(3) var<storage, read_write> norm: array<f32>;
@group(0) @binding(4) var<storage, read> y: array<f32>;

const WG: u32 = 64u;
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

@compute @workgroup_size(64, 1, 1)
fn forward_wg(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
              @builtin(local_invocation_index) lid: u32) {
    let row = wid.x + wid.y * nwg.x;
    if row >= p.rows { return; }
    let base = row * p.cols;
    var s = 0.0;
    for (var c = lid; c < p.cols; c += WG) { let v = src[base + c]; s = fma(v, v, s); }
    let n = sqrt(wg_sum(lid, s));
    for (var c = lid; c < p.cols; c += WG) { dst[base + c] = src[base + c] / n; }
    if lid == 0u { norm[row] = n; }
}

@compute @workgroup_size(256, 1, 1)
fn forward_row(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let row = gid.x + gid.y * nwg.x * 256u;
    if row >= p.rows { return; }
    let base = row * p.cols;
    var s = 0.0;
    for (var c = 0u; c < p.cols; c++) { let v = src[base + c]; s = fma(v, v, s); }
    let n = sqrt(s);
    for (var c = 0u; c < p.cols; c++) { dst[base + c] = src[base + c] / n; }
    norm[row] = n;
}

@compute @workgroup_size(64, 1, 1)
fn backward_wg(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
               @builtin(local_invocation_index) lid: u32) {
    let row = wid.x + wid.y * nwg.x;
    if row >= p.rows { return; }
    let base = row * p.cols;
    var d = 0.0;
    for (var c = lid; c < p.cols; c += WG) { d = fma(y[base + c], src[base + c], d); }
    d = wg_sum(lid, d);
    let n = norm[row];
    for (var c = lid; c < p.cols; c += WG) { dst[base + c] = (src[base + c] - y[base + c] * d) / n; }
}

@compute @workgroup_size(256, 1, 1)
fn backward_row(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let row = gid.x + gid.y * nwg.x * 256u;
    if row >= p.rows { return; }
    let base = row * p.cols;
    var d = 0.0;
    for (var c = 0u; c < p.cols; c++) { d = fma(y[base + c], src[base + c], d); }
    let n = norm[row];
    for (var c = 0u; c < p.cols; c++) { dst[base + c] = (src[base + c] - y[base + c] * d) / n; }
}

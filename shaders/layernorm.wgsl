// LayerNorm over the last dimension, PyTorch semantics (biased variance):
// y = (x - mean) * rstd * gamma + beta, rstd = 1 / sqrt(var + eps).
// Row kernels come in two layouts with the same arithmetic per element:
// *_wg runs one 64-thread workgroup per row (coalesced loads, fixed tree
// reduction: GPUs); *_row runs one thread per row (SIMD lanes over rows, no
// barriers: CPU adapters). Both are deterministic.
//
// Bindings are shared by all entry points so the types agree; binding 4 is
// beta in the forward and dy in the backward.
//   forward_*:     x, mean (out), rstd (out), beta,  y (out),        gamma
//   backward_dx_*: x, mean,       rstd,       dy,    dx (out),       gamma
//                  (chunk != 0: dx is added into out, a pending gradient)
//   param_partials: x, mean,      rstd,       dy,    partials (out)

struct Params { rows: u32, cols: u32, eps: f32, chunk: u32 }

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read_write> mean: array<f32>;
@group(0) @binding(3) var<storage, read_write> rstd: array<f32>;
@group(0) @binding(4) var<storage, read> beta_or_dy: array<f32>;
@group(0) @binding(5) var<storage, read_write> out: array<f32>;
@group(0) @binding(6) var<storage, read> gamma: array<f32>;

const WG: u32 = 64u;
var<workgroup> red: array<vec2<f32>, WG>;

// Sum of v over the workgroup in a fixed tree order; every thread gets it.
fn wg_sum(lid: u32, v: vec2<f32>) -> vec2<f32> {
    red[lid] = v;
    workgroupBarrier();
    for (var off = WG / 2u; off > 0u; off >>= 1u) {
        if lid < off { red[lid] += red[lid + off]; }
        workgroupBarrier();
    }
    let s = red[0];
    workgroupBarrier(); // red is reused by the next call
    return s;
}

@compute @workgroup_size(64, 1, 1)
fn forward_wg(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
              @builtin(local_invocation_index) lid: u32) {
    let row = wid.x + wid.y * nwg.x;
    if row >= p.rows { return; }
    let base = row * p.cols;
    let n = f32(p.cols);
    var s = 0.0;
    for (var c = lid; c < p.cols; c += WG) { s += x[base + c]; }
    let mu = wg_sum(lid, vec2(s, 0.0)).x / n;
    // Two passes: the variance of centred values does not cancel.
    var v = 0.0;
    for (var c = lid; c < p.cols; c += WG) { let d = x[base + c] - mu; v = fma(d, d, v); }
    let r = 1.0 / sqrt(wg_sum(lid, vec2(v, 0.0)).x / n + p.eps);
    for (var c = lid; c < p.cols; c += WG) {
        out[base + c] = fma((x[base + c] - mu) * r, gamma[c], beta_or_dy[c]);
    }
    if lid == 0u { mean[row] = mu; rstd[row] = r; }
}

@compute @workgroup_size(256, 1, 1)
fn forward_row(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let row = gid.x + gid.y * nwg.x * 256u;
    if row >= p.rows { return; }
    let base = row * p.cols;
    let n = f32(p.cols);
    var s = 0.0;
    for (var c = 0u; c < p.cols; c++) { s += x[base + c]; }
    let mu = s / n;
    var v = 0.0;
    for (var c = 0u; c < p.cols; c++) { let d = x[base + c] - mu; v = fma(d, d, v); }
    let r = 1.0 / sqrt(v / n + p.eps);
    for (var c = 0u; c < p.cols; c++) {
        out[base + c] = fma((x[base + c] - mu) * r, gamma[c], beta_or_dy[c]);
    }
    mean[row] = mu;
    rstd[row] = r;
}

// dx = rstd * (g - mean(g) - xhat * mean(g * xhat)), g = gamma * dy.
@compute @workgroup_size(64, 1, 1)
fn backward_dx_wg(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                  @builtin(local_invocation_index) lid: u32) {
    let row = wid.x + wid.y * nwg.x;
    if row >= p.rows { return; }
    let base = row * p.cols;
    let mu = mean[row];
    let r = rstd[row];
    var s = vec2(0.0, 0.0);
    for (var c = lid; c < p.cols; c += WG) {
        let g = gamma[c] * beta_or_dy[base + c];
        let xh = (x[base + c] - mu) * r;
        s = vec2(s.x + g, fma(g, xh, s.y));
    }
    let m = wg_sum(lid, s) / f32(p.cols);
    for (var c = lid; c < p.cols; c += WG) {
        let g = gamma[c] * beta_or_dy[base + c];
        let xh = (x[base + c] - mu) * r;
        var d = r * (g - m.x - xh * m.y);
        if p.chunk != 0u { d += out[base + c]; }
        out[base + c] = d;
    }
}

@compute @workgroup_size(256, 1, 1)
fn backward_dx_row(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let row = gid.x + gid.y * nwg.x * 256u;
    if row >= p.rows { return; }
    let base = row * p.cols;
    let mu = mean[row];
    let r = rstd[row];
    var s = vec2(0.0, 0.0);
    for (var c = 0u; c < p.cols; c++) {
        let g = gamma[c] * beta_or_dy[base + c];
        let xh = (x[base + c] - mu) * r;
        s = vec2(s.x + g, fma(g, xh, s.y));
    }
    let m = s / f32(p.cols);
    for (var c = 0u; c < p.cols; c++) {
        let g = gamma[c] * beta_or_dy[base + c];
        let xh = (x[base + c] - mu) * r;
        var d = r * (g - m.x - xh * m.y);
        if p.chunk != 0u { d += out[base + c]; }
        out[base + c] = d;
    }
}

// Per (column, chunk of rows): partials[chunk, col] = sum dy * xhat (dgamma)
// and partials[chunk, cols + col] = sum dy (dbeta); the chunks are then
// summed by reduce.wgsl's column sum. Threads of a workgroup take adjacent
// columns, so loads are coalesced.
@compute @workgroup_size(64, 1, 1)
fn param_partials(@builtin(global_invocation_id) gid: vec3<u32>) {
    let col = gid.x;
    let ch = gid.y;
    if col >= p.cols { return; }
    let r0 = ch * p.chunk;
    let r1 = min(r0 + p.chunk, p.rows);
    var sg = 0.0;
    var sb = 0.0;
    for (var row = r0; row < r1; row++) {
        let i = row * p.cols + col;
        let d = beta_or_dy[i];
        sg = fma(d, (x[i] - mean[row]) * rstd[row], sg);
        sb += d;
    }
    let o = ch * 2u * p.cols + col;
    out[o] = sg;
    out[o + p.cols] = sb;
}

// forward_row / backward_dx_row four columns at a time (cols % 4 == 0): a
// quarter of llvmpipe's per-lane load loops. Same bindings, as vec4s.
@group(0) @binding(1) var<storage, read> x4: array<vec4<f32>>;
@group(0) @binding(4) var<storage, read> beta_or_dy4: array<vec4<f32>>;
@group(0) @binding(5) var<storage, read_write> out4: array<vec4<f32>>;
@group(0) @binding(6) var<storage, read> gamma4: array<vec4<f32>>;

fn hsum(v: vec4<f32>) -> f32 { return (v.x + v.y) + (v.z + v.w); }

@compute @workgroup_size(256, 1, 1)
fn forward_row4(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let row = gid.x + gid.y * nwg.x * 256u;
    if row >= p.rows { return; }
    let c4 = p.cols / 4u;
    let base = row * c4;
    let n = f32(p.cols);
    var s = vec4(0.0);
    for (var c = 0u; c < c4; c++) { s += x4[base + c]; }
    let mu = hsum(s) / n;
    var v = vec4(0.0);
    for (var c = 0u; c < c4; c++) { let d = x4[base + c] - mu; v = fma(d, d, v); }
    let r = 1.0 / sqrt(hsum(v) / n + p.eps);
    for (var c = 0u; c < c4; c++) {
        out4[base + c] = fma((x4[base + c] - mu) * r, gamma4[c], beta_or_dy4[c]);
    }
    mean[row] = mu;
    rstd[row] = r;
}

@compute @workgroup_size(256, 1, 1)
fn backward_dx_row4(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let row = gid.x + gid.y * nwg.x * 256u;
    if row >= p.rows { return; }
    let c4 = p.cols / 4u;
    let base = row * c4;
    let mu = mean[row];
    let r = rstd[row];
    var sg = vec4(0.0);
    var sx = vec4(0.0);
    for (var c = 0u; c < c4; c++) {
        let g = gamma4[c] * beta_or_dy4[base + c];
        let xh = (x4[base + c] - mu) * r;
        sg += g;
        sx = fma(g, xh, sx);
    }
    let n = f32(p.cols);
    let m = vec2(hsum(sg), hsum(sx)) / n;
    for (var c = 0u; c < c4; c++) {
        let g = gamma4[c] * beta_or_dy4[base + c];
        let xh = (x4[base + c] - mu) * r;
        var d = r * (g - m.x - xh * m.y);
        if p.chunk != 0u { d += out4[base + c]; }
        out4[base + c] = d;
    }
}

// param_partials four columns a thread (cols % 4 == 0); same sums, same
// order per column.
@compute @workgroup_size(64, 1, 1)
fn param_partials4(@builtin(global_invocation_id) gid: vec3<u32>) {
    let c4 = p.cols / 4u;
    let col = gid.x;
    let ch = gid.y;
    if col >= c4 { return; }
    let r0 = ch * p.chunk;
    let r1 = min(r0 + p.chunk, p.rows);
    var sg = vec4(0.0);
    var sb = vec4(0.0);
    for (var row = r0; row < r1; row++) {
        let i = row * c4 + col;
        let d = beta_or_dy4[i];
        sg = fma(d, (x4[i] - mean[row]) * rstd[row], sg);
        sb += d;
    }
    let o = ch * 2u * c4 + col;
    out4[o] = sg;
    out4[o + c4] = sb;
}

// The residual add folded into the following layer norm (cols % 4 == 0):
// sum = x + o, out = layernorm(sum) in one pass over the rows.
@group(0) @binding(7) var<storage, read> o4: array<vec4<f32>>;
@group(0) @binding(8) var<storage, read_write> sum4: array<vec4<f32>>;

@compute @workgroup_size(256, 1, 1)
fn forward_add_row4(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let row = gid.x + gid.y * nwg.x * 256u;
    if row >= p.rows { return; }
    let c4 = p.cols / 4u;
    let base = row * c4;
    let n = f32(p.cols);
    var s = vec4(0.0);
    for (var c = 0u; c < c4; c++) {
        let v = x4[base + c] + o4[base + c];
        sum4[base + c] = v;
        s += v;
    }
    let mu = hsum(s) / n;
    var v = vec4(0.0);
    for (var c = 0u; c < c4; c++) { let d = (x4[base + c] + o4[base + c]) - mu; v = fma(d, d, v); }
    let r = 1.0 / sqrt(hsum(v) / n + p.eps);
    for (var c = 0u; c < c4; c++) {
        out4[base + c] = fma(((x4[base + c] + o4[base + c]) - mu) * r, gamma4[c], beta_or_dy4[c]);
    }
    mean[row] = mu;
    rstd[row] = r;
}

// Deterministic reductions (fixed summation order, no atomics).
// colsum: out[chunk, col] (+)= sum of x[r, col] over the rows of one chunk.
// Run once with chunk = rows, or twice (chunks of 64 rows, then the partials)
// so that tall inputs still spread over many threads.

struct Params { rows: u32, cols: u32, chunk: u32, accumulate: u32 }

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read_write> out: array<f32>;

@compute @workgroup_size(64, 1, 1)
fn colsum(@builtin(global_invocation_id) gid: vec3<u32>) {
    let col = gid.x;
    let ch = gid.y;
    if col >= p.cols { return; }
    let r0 = ch * p.chunk;
    let r1 = min(r0 + p.chunk, p.rows);
    var s = 0.0;
    for (var r = r0; r < r1; r++) { s += x[r * p.cols + col]; }
    let o = ch * p.cols + col;
    if p.accumulate != 0u { s += out[o]; }
    out[o] = s;
}

// sumsq: out[cols + chunk] = sum of x[i]^2 over one chunk of a flat array
// (cols: where this array's partials start in out).
@compute @workgroup_size(64, 1, 1)
fn sumsq(@builtin(global_invocation_id) gid: vec3<u32>) {
    let ch = gid.x;
    let r0 = ch * p.chunk;
    if r0 >= p.rows { return; }
    let r1 = min(r0 + p.chunk, p.rows);
    var s = 0.0;
    for (var r = r0; r < r1; r++) { s = fma(x[r], x[r], s); }
    out[p.cols + ch] = s;
}

// sumsq for GPUs: a workgroup a chunk, thread t adding elements t, t + 64,
// ... (consecutive threads read consecutive elements), then a fixed tree.
var<workgroup> red: array<f32, 64>;

@compute @workgroup_size(64, 1, 1)
fn sumsq_wg(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
            @builtin(local_invocation_index) lid: u32) {
    let ch = wid.x + wid.y * nwg.x;
    let r0 = ch * p.chunk;
    if r0 >= p.rows { return; }
    let r1 = min(r0 + p.chunk, p.rows);
    var s = 0.0;
    for (var r = r0 + lid; r < r1; r += 64u) { s = fma(x[r], x[r], s); }
    red[lid] = s;
    workgroupBarrier();
    for (var off = 32u; off > 0u; off >>= 1u) {
        if lid < off { red[lid] += red[lid + off]; }
        workgroupBarrier();
    }
    if lid == 0u { out[p.cols + ch] = red[0]; }
}

// colsum four columns at a time (cols % 4 == 0): the same sums in the same
// order, a quarter of llvmpipe's per-lane load loops. Same bindings, vec4s.
@group(0) @binding(1) var<storage, read> x4: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read_write> out4: array<vec4<f32>>;

@compute @workgroup_size(64, 1, 1)
fn colsum4(@builtin(global_invocation_id) gid: vec3<u32>) {
    let c4 = p.cols / 4u;
    let col = gid.x;
    let ch = gid.y;
    if col >= c4 { return; }
    let r0 = ch * p.chunk;
    let r1 = min(r0 + p.chunk, p.rows);
    var s = vec4(0.0);
    for (var r = r0; r < r1; r++) { s += x4[r * c4 + col]; }
    let o = ch * c4 + col;
    if p.accumulate != 0u { s += out4[o]; }
    out4[o] = s;
}

// sumsq over chunks of whole vec4s (chunk % 4 == 0, n % 4 == 0): four
// running sums, added at the end.
@compute @workgroup_size(64, 1, 1)
fn sumsq4(@builtin(global_invocation_id) gid: vec3<u32>) {
    let ch = gid.x;
    let r0 = ch * p.chunk / 4u;
    let n4 = p.rows / 4u;
    if r0 >= n4 { return; }
    let r1 = min(r0 + p.chunk / 4u, n4);
    var s = vec4(0.0);
    for (var r = r0; r < r1; r++) { let v = x4[r]; s = fma(v, v, s); }
    out[p.cols + ch] = (s.x + s.y) + (s.z + s.w);
}

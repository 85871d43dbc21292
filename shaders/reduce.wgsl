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

// sumsq: out[chunk] = sum of x[i]^2 over one chunk of a flat array.
@compute @workgroup_size(64, 1, 1)
fn sumsq(@builtin(global_invocation_id) gid: vec3<u32>) {
    let ch = gid.x;
    let r0 = ch * p.chunk;
    if r0 >= p.rows { return; }
    let r1 = min(r0 + p.chunk, p.rows);
    var s = 0.0;
    for (var r = r0; r < r1; r++) { s = fma(x[r], x[r], s); }
    out[ch] = s;
}

// Row gather (token embeddings, pooled-token selection, slicing rows out of
// a gradient) and its backward, a scatter-add done without atomics: the host
// groups the positions by id (CSR), so one thread owns one (id, column) of
// the table gradient and sums its dy rows in position order (deterministic).
// A table larger than the adapter binds is worked on in windows of rows: the
// bound table (src of gather, dst of scatter_rows) holds rows
// [row0, row0 + rows), and ids outside them are another dispatch's.

struct Params { n: u32, d: u32, uniq: u32, row0: u32, rows: u32, _a: u32, _b: u32, _c: u32 }

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> src: array<f32>;
@group(0) @binding(2) var<storage, read> idx: array<u32>;
@group(0) @binding(3) var<storage, read_write> dst: array<f32>;

// dst[r, c] = src[idx[r], c] for r < n (dst is [n, d], src viewed [V, d]).
@compute @workgroup_size(256, 1, 1)
fn gather(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = gid.x + gid.y * nwg.x * 256u;
    if i >= p.n * p.d { return; }
    let r = i / p.d;
    let c = i - r * p.d;
    let id = idx[r];
    if id < p.row0 || id - p.row0 >= p.rows { return; }
    dst[i] = src[(id - p.row0) * p.d + c];
}

// idx = [ids (uniq) | offsets (uniq + 1) | positions (n)]: the positions of
// ids[k] are positions[offsets[k] .. offsets[k + 1]], in increasing order.
// dst[ids[k], c] = sum over those positions q of src[q, c]; rows of dst that
// no id names are left as they are (zeros).
@compute @workgroup_size(256, 1, 1)
fn scatter_rows(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = gid.x + gid.y * nwg.x * 256u;
    if i >= p.uniq * p.d { return; }
    let k = i / p.d;
    let c = i - k * p.d;
    let id = idx[k];
    if id < p.row0 || id - p.row0 >= p.rows { return; }
    let lo = idx[p.uniq + k];
    let hi = idx[p.uniq + k + 1u];
    let pos0 = 2u * p.uniq + 1u;
    var s = 0.0;
    for (var j = lo; j < hi; j++) {
        s += src[idx[pos0 + j] * p.d + c];
    }
    dst[(id - p.row0) * p.d + c] = s;
}

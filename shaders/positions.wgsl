// Where each column's own row stands in that column's ranking: how many
// rows rank before row own[c] in column c (higher score, or an equal score
// and a lower row: topk.wgsl's order). Retrieval recall@K needs only this
// position (recall@K: position < K), not the K best themselves, and a count
// is one compare per score where a top-k keeps a sorted list.
//
// A thread takes four adjacent columns and reads a vec4 per row (the
// columns are the fast axis: lanes read adjacent vec4s).
//
//   positions: scores [rows, stride] (stride % 4 == 0; read as vec4s),
//              own (u32) [cols], out (u32) [cols]

struct Params { rows: u32, cols: u32, stride4: u32, _a: u32 }

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> scores: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> own: array<u32>;
@group(0) @binding(3) var<storage, read_write> out: array<u32>;

// Column c's own row and its score there.
fn own_of(g: u32, c: u32, lane: u32) -> vec2<u32> {
    let r = own[min(c, p.cols - 1u)];
    return vec2(r, bitcast<u32>(scores[r * p.stride4 + g][lane]));
}

@compute @workgroup_size(64, 1, 1)
fn positions(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let g = gid.x + gid.y * nwg.x * 64u;
    let c0 = 4u * g;
    if c0 >= p.cols { return; }
    let o0 = own_of(g, c0, 0u);
    let o1 = own_of(g, c0 + 1u, 1u);
    let o2 = own_of(g, c0 + 2u, 2u);
    let o3 = own_of(g, c0 + 3u, 3u);
    let rows = vec4(o0.x, o1.x, o2.x, o3.x);
    let t = bitcast<vec4<f32>>(vec4(o0.y, o1.y, o2.y, o3.y));
    var n = vec4<u32>(0u);
    for (var r = 0u; r < p.rows; r++) {
        let v = scores[r * p.stride4 + g];
        let ahead = (v > t) | ((v == t) & (vec4(r) < rows));
        n += select(vec4(0u), vec4(1u), ahead);
    }
    for (var j = 0u; j < 4u; j++) {
        if c0 + j < p.cols { out[c0 + j] = n[j]; }
    }
}

// Vision tower input: prepend the class token to the patch embeddings and
// add the position embeddings, in one pass:
//   out[b, 0, :]     = class + pos[0]
//   out[b, 1 + q, :] = patches[b, q, :] + pos[1 + q]
// (Its own file because its bindings differ from embedding.wgsl's. The
// backward is a row gather and a column sum: see src/ops/embedding.rs.)

struct Params { batch: u32, np: u32, d: u32, _a: u32 }

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> patches: array<f32>;
@group(0) @binding(2) var<storage, read> cls: array<f32>;
@group(0) @binding(3) var<storage, read> pos: array<f32>;
@group(0) @binding(4) var<storage, read_write> out: array<f32>;

@compute @workgroup_size(256, 1, 1)
fn class_pos(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = gid.x + gid.y * nwg.x * 256u;
    let t_len = p.np + 1u;
    if i >= p.batch * t_len * p.d { return; }
    let c = i % p.d;
    let t = (i / p.d) % t_len;
    let b = i / (p.d * t_len);
    var x: f32;
    if t == 0u {
        x = cls[c];
    } else {
        x = patches[(b * p.np + t - 1u) * p.d + c];
    }
    out[i] = x + pos[t * p.d + c];
}

// Four values a thread where d % 4 == 0 (a quarter of llvmpipe's per-lane
// load loops). Same bindings, as vec4s.
@group(0) @binding(1) var<storage, read> patches4: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> cls4: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read> pos4: array<vec4<f32>>;
@group(0) @binding(4) var<storage, read_write> out4: array<vec4<f32>>;

@compute @workgroup_size(256, 1, 1)
fn class_pos4(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = gid.x + gid.y * nwg.x * 256u;
    let t_len = p.np + 1u;
    let d4 = p.d / 4u;
    if i >= p.batch * t_len * d4 { return; }
    let c = i % d4;
    let t = (i / d4) % t_len;
    let b = i / (d4 * t_len);
    var x: vec4<f32>;
    if t == 0u {
        x = cls4[c];
    } else {
        x = patches4[(b * p.np + t - 1u) * d4 + c];
    }
    out4[i] = x + pos4[t * d4 + c];
}

// In-place clamp: x = min(max(x, lo), hi). Used after the optimizer step to
// keep logit_scale <= ln(100), as OpenCLIP does.

struct Params { n: u32, lo: f32, hi: f32, _pad: u32 }

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read_write> x: array<f32>;

@compute @workgroup_size(256, 1, 1)
fn clamp_inplace(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = gid.x + gid.y * nwg.x * 256u;
    if i >= p.n { return; }
    x[i] = min(max(x[i], p.lo), p.hi);
}

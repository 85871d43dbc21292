// Elementwise arithmetic. The index spills into gid.y past 65535 workgroups.

struct Params { n: u32, nb: u32, _a: u32, _b: u32 }

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> a: array<f32>;
@group(0) @binding(2) var<storage, read> b: array<f32>;
@group(0) @binding(3) var<storage, read_write> out: array<f32>;

fn index(gid: vec3<u32>, nwg: vec3<u32>) -> u32 { return gid.x + gid.y * nwg.x * 256u; }

// out = a + b, where b repeats every nb elements (nb = n: plain add;
// nb = last dim: bias; nb = T*D: position embedding over a batch).
@compute @workgroup_size(256, 1, 1)
fn add(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = index(gid, nwg);
    if i >= p.n { return; }
    out[i] = a[i] + b[i % p.nb];
}

// add, four values at a time (n % 4 == 0, nb % 4 == 0): a quarter of the
// per-lane load loops on llvmpipe. Same bindings, as vec4s.
@group(0) @binding(1) var<storage, read> a4: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> b4: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read_write> out4: array<vec4<f32>>;

@compute @workgroup_size(256, 1, 1)
fn add4(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = index(gid, nwg);
    if i >= p.n / 4u { return; }
    out4[i] = a4[i] + b4[i % (p.nb / 4u)];
}

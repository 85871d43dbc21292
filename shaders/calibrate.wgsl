// Peak calibration for `clip-wgpu bench`: what this adapter does at best, so
// each kernel's rate can be shown as a share of it.
//   fma_peak:  8 independent vec4 FMA chains per thread (no memory traffic);
//              flops = n * iters * 8 * 4 * 2.
//   copy_peak: dst = src in vec4s; bytes = 2 * 16 * n.

struct Params { n: u32, iters: u32, mul: f32, add: f32 }

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read_write> dst: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> src: array<vec4<f32>>;

@compute @workgroup_size(64, 1, 1)
fn fma_peak(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = gid.x + gid.y * nwg.x * 64u;
    if i >= p.n { return; }
    let m = vec4<f32>(p.mul);
    let c = vec4<f32>(p.add);
    let x = f32(i % 97u) * 0.01;
    var a0 = vec4<f32>(x, x + 0.1, x + 0.2, x + 0.3);
    var a1 = a0 + 1.0;
    var a2 = a0 + 2.0;
    var a3 = a0 + 3.0;
    var a4 = a0 + 4.0;
    var a5 = a0 + 5.0;
    var a6 = a0 + 6.0;
    var a7 = a0 + 7.0;
    for (var t = 0u; t < p.iters; t++) {
        a0 = fma(a0, m, c);
        a1 = fma(a1, m, c);
        a2 = fma(a2, m, c);
        a3 = fma(a3, m, c);
        a4 = fma(a4, m, c);
        a5 = fma(a5, m, c);
        a6 = fma(a6, m, c);
        a7 = fma(a7, m, c);
    }
    dst[i] = ((a0 + a1) + (a2 + a3)) + ((a4 + a5) + (a6 + a7));
}

@compute @workgroup_size(64, 1, 1)
fn copy_peak(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = gid.x + gid.y * nwg.x * 64u;
    if i >= p.n { return; }
    dst[i] = src[i];
}

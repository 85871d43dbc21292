// Swap the middle axes of a 4-D tensor, with zero padding or cropping of the
// swapped axes: out[a, y, x, z] = in[a, x, y, z] where x < nx and y < ny,
// else 0; in is [na, nx, ny, nz], out is [na, ny_out, nx_out, nz].
// With z = 1 this is a batched transpose; with [B, T, H, D] it splits heads
// into [B, H, T, D] (and the same kernel with x and y swapped merges them).
// Padding T to a multiple of 4 lets attention use the vec4 matmul.

struct Params { na: u32, nx: u32, ny: u32, nz: u32, nx_out: u32, ny_out: u32 }

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> src: array<f32>;
@group(0) @binding(2) var<storage, read_write> dst: array<f32>;

@compute @workgroup_size(256, 1, 1)
fn swap12(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = gid.x + gid.y * nwg.x * 256u;  // index into dst [a, y, x, z]
    let n = p.na * p.nx_out * p.ny_out * p.nz;
    if i >= n { return; }
    let z = i % p.nz;
    let x = (i / p.nz) % p.nx_out;
    let y = (i / (p.nz * p.nx_out)) % p.ny_out;
    let a = i / (p.nz * p.nx_out * p.ny_out);
    var v = 0.0;
    if x < p.nx && y < p.ny {
        v = src[((a * p.nx + x) * p.ny + y) * p.nz + z];
    }
    dst[i] = v;
}

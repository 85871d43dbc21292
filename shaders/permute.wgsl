// Swap the middle axes of a 4-D tensor: out[a, y, x, z] = in[a, x, y, z].
// With z = 1 this is a batched transpose; with [B, T, H, D] it splits heads
// into [B, H, T, D] (and the same kernel with x and y swapped merges them).

struct Params { na: u32, nx: u32, ny: u32, nz: u32 }

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> src: array<f32>;
@group(0) @binding(2) var<storage, read_write> dst: array<f32>;

@compute @workgroup_size(256, 1, 1)
fn swap12(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = gid.x + gid.y * nwg.x * 256u;  // index into dst [a, y, x, z]
    let n = p.na * p.nx * p.ny * p.nz;
    if i >= n { return; }
    let z = i % p.nz;
    let x = (i / p.nz) % p.nx;
    let y = (i / (p.nz * p.nx)) % p.ny;
    let a = i / (p.nz * p.nx * p.ny);
    dst[i] = src[((a * p.nx + x) * p.ny + y) * p.nz + z];
}

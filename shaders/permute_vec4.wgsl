// permute.wgsl's swap12 moving whole vec4s: used when the innermost axis
// (nz, here counted in vec4s) is a multiple of 4, e.g. attention heads.

struct Params { na: u32, nx: u32, ny: u32, nz: u32, nx_out: u32, ny_out: u32 }

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> src: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read_write> dst: array<vec4<f32>>;

@compute @workgroup_size(256, 1, 1)
fn swap12_vec4(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = gid.x + gid.y * nwg.x * 256u;  // index into dst [a, y, x, z]
    let n = p.na * p.nx_out * p.ny_out * p.nz;
    if i >= n { return; }
    let z = i % p.nz;
    let x = (i / p.nz) % p.nx_out;
    let y = (i / (p.nz * p.nx_out)) % p.ny_out;
    let a = i / (p.nz * p.nx_out * p.ny_out);
    var v = vec4<f32>(0.0);
    if x < p.nx && y < p.ny {
        v = src[((a * p.nx + x) * p.ny + y) * p.nz + z];
    }
    dst[i] = v;
}

// Batched transpose in 4x4 blocks (rows % 4 == 0, cols % 4 == 0): in is
// [na, nx, ny] (nx rows of ny), out [na, ny, nx]. A thread reads four vec4
// rows of a block and writes its four columns as vec4s: 8 vector accesses
// per 16 values instead of 32 scalar ones. (nz unused: 1.)
@compute @workgroup_size(256, 1, 1)
fn transpose4(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let t = gid.x + gid.y * nwg.x * 256u;  // one 4x4 block
    let bx = p.nx / 4u;
    let by = p.ny / 4u;
    if t >= p.na * bx * by { return; }
    let j = t % by;          // block column (in vec4s of a source row)
    let i = (t / by) % bx;   // block row
    let a = t / (bx * by);
    let s0 = (a * p.nx + 4u * i) * by + j;
    let r0 = src[s0];
    let r1 = src[s0 + by];
    let r2 = src[s0 + 2u * by];
    let r3 = src[s0 + 3u * by];
    let d0 = (a * p.ny + 4u * j) * bx + i;
    dst[d0] = vec4(r0.x, r1.x, r2.x, r3.x);
    dst[d0 + bx] = vec4(r0.y, r1.y, r2.y, r3.y);
    dst[d0 + 2u * bx] = vec4(r0.z, r1.z, r2.z, r3.z);
    dst[d0 + 3u * bx] = vec4(r0.w, r1.w, r2.w, r3.w);
}

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

// Patch embedding (Conv2d with kernel = stride = patch, no bias) as
// im2col + matmul. Patches do not overlap, so im2col is a pure permutation
// of the pixels it keeps and col2im (the pixel gradient) is its inverse;
// trailing rows/columns that fill no whole patch are dropped, as PyTorch's
// convolution does, and get a zero gradient.
//
// cols[(b*P + py*gw + px), (ch*p + kh)*p + kw] = pixels[b, ch, py*p + kh, px*p + kw]
// with P = gh*gw patches in row-major order (conv(...).flatten(2).transpose(1, 2))
// and columns in the order of the weight [D, C, p, p] flattened to [D, C*p*p].

struct Params { b: u32, c: u32, h: u32, w: u32, p: u32, gh: u32, gw: u32, _a: u32 }

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> src: array<f32>;
@group(0) @binding(2) var<storage, read_write> dst: array<f32>;

// src = pixels [B, C, H, W], dst = cols [B*P, C*p*p].
@compute @workgroup_size(256, 1, 1)
fn im2col(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = gid.x + gid.y * nwg.x * 256u;
    let pp = p.p * p.p;
    let k = p.c * pp;
    let np = p.gh * p.gw;
    if i >= p.b * np * k { return; }
    let col = i % k;
    let row = i / k;
    let bi = row / np;
    let q = row % np;
    let py = q / p.gw;
    let px = q % p.gw;
    let ch = col / pp;
    let r = col % pp;
    let y = py * p.p + r / p.p;
    let x = px * p.p + r % p.p;
    dst[i] = src[((bi * p.c + ch) * p.h + y) * p.w + x];
}

// im2col four columns a thread (p % 4 == 0 and w % 4 == 0: a patch row's
// four pixels are one aligned vec4 of src and of dst): a quarter of the
// per-lane load loops and integer divisions, which llvmpipe does lane by
// lane. Same bindings, as vec4s.
@group(0) @binding(1) var<storage, read> src4: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read_write> dst4: array<vec4<f32>>;

@compute @workgroup_size(256, 1, 1)
fn im2col4(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = gid.x + gid.y * nwg.x * 256u;
    let pp = p.p * p.p;
    let k4 = p.c * pp / 4u;
    let np = p.gh * p.gw;
    if i >= p.b * np * k4 { return; }
    let col = (i % k4) * 4u;
    let row = i / k4;
    let bi = row / np;
    let q = row % np;
    let ch = col / pp;
    let r = col % pp;
    let y = (q / p.gw) * p.p + r / p.p;
    let x = (q % p.gw) * p.p + r % p.p;
    dst4[i] = src4[(((bi * p.c + ch) * p.h + y) * p.w + x) / 4u];
}

// src = dcols [B*P, C*p*p], dst = dpixels [B, C, H, W] (every element written).
@compute @workgroup_size(256, 1, 1)
fn col2im(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = gid.x + gid.y * nwg.x * 256u;
    if i >= p.b * p.c * p.h * p.w { return; }
    let x = i % p.w;
    let y = (i / p.w) % p.h;
    let ch = (i / (p.w * p.h)) % p.c;
    let bi = i / (p.w * p.h * p.c);
    var v = 0.0;
    if y < p.gh * p.p && x < p.gw * p.p {
        let row = bi * p.gh * p.gw + (y / p.p) * p.gw + x / p.p;
        let col = (ch * p.p + y % p.p) * p.p + x % p.p;
        v = src[row * p.c * p.p * p.p + col];
    }
    dst[i] = v;
}

// f32 <-> 16-bit storage (--fp16, --bf16): two values a u32 word, the
// element of even index in the low half (little-endian, as safetensors and
// a GPU's f16 array lay them out). One thread a word, so no two threads
// write the same word. Rounding is to nearest even, overflow gives
// infinity, NaN stays NaN: bit-exact with src/precision.rs (the `half`
// crate), done in integer arithmetic because WGSL leaves pack2x16float's
// rounding and overflow to the implementation.
//
// FMT 0: IEEE binary16; FMT 1: bfloat16 (the upper half of an f32).
//
//   pack_words:   x f32 [n] -> w u32 [(n + 1) / 2]
//   unpack_words: w -> x
//   round_values: x = round(x) in place (the value the format stores)
//   round_pack:   both (x rounded in place, w its packed copy)

struct Params { n: u32, _a: u32, _b: u32, _c: u32 }

// BEGIN shared with the matmuls' 16-bit operands (build.rs copies it there)
override FMT: u32 = 0u;

// Four 16-bit patterns (one each in the low bits) as f32, exactly. f16:
// normal values move their exponent and mantissa into place; subnormals
// are m * 2^-24 (a product f32 holds exactly, so no flush-to-zero of an
// f32 denormal can touch it); infinities and NaNs keep their payload.
fn values4(h: vec4<u32>) -> vec4<f32> {
    if FMT == 1u { return bitcast<vec4<f32>>(h << vec4(16u)); }
    let sign = (h & vec4(0x8000u)) << vec4(16u);
    let em = h & vec4(0x7fffu);
    let normal = (em << vec4(13u)) + vec4(112u << 23u);
    let sub = bitcast<vec4<u32>>(vec4<f32>(em) * 5.9604645e-8);
    let special = vec4(0x7f800000u) | ((em & vec4(0x3ffu)) << vec4(13u));
    let mag = select(select(normal, sub, em < vec4(0x400u)), special, em >= vec4(0x7c00u));
    return bitcast<vec4<f32>>(sign | mag);
}

// Two packed words (four values, the lower index in the low half) as f32.
fn unpack4(w: vec2<u32>) -> vec4<f32> {
    return values4(vec4(w.x & 0xffffu, w.x >> 16u, w.y & 0xffffu, w.y >> 16u));
}

fn f16_bits(v: f32) -> u32 {
    let b = bitcast<u32>(v);
    let sign = (b >> 16u) & 0x8000u;
    let e = (b >> 23u) & 0xffu;
    let m = b & 0x7fffffu;
    if e == 0xffu {
        // Infinity, or NaN with its top payload bits (kept quiet).
        return sign | 0x7c00u | select(0u, 0x200u | (m >> 13u), m != 0u);
    }
    let ex = i32(e) - 127;
    if ex >= 16 { return sign | 0x7c00u; }
    if ex >= -14 {
        var h = (u32(ex + 15) << 10u) | (m >> 13u);
        let r = m & 0x1fffu;
        // A carry out of the mantissa steps the exponent (to infinity at the top).
        if r > 0x1000u || (r == 0x1000u && (h & 1u) == 1u) { h += 1u; }
        return sign | h;
    }
    if ex < -25 { return sign; }
    // Subnormal: units of 2^-24; the 24-bit significand shifted right.
    let full = m | 0x800000u;
    let shift = u32(-(ex + 1));
    var h = full >> shift;
    let rem = full & ((1u << shift) - 1u);
    let halfway = 1u << (shift - 1u);
    if rem > halfway || (rem == halfway && (h & 1u) == 1u) { h += 1u; }
    return sign | h;
}

fn bf16_bits(v: f32) -> u32 {
    let b = bitcast<u32>(v);
    if (b & 0x7fffffffu) > 0x7f800000u { return (b >> 16u) | 0x40u; }
    return (b + 0x7fffu + ((b >> 16u) & 1u)) >> 16u;
}

fn bits(v: f32) -> u32 {
    if FMT == 1u { return bf16_bits(v); }
    return f16_bits(v);
}

// The values the format stores nearest each of `v` (autocast's rounding of
// an op's output).
fn round4(v: vec4<f32>) -> vec4<f32> {
    return values4(vec4(bits(v.x), bits(v.y), bits(v.z), bits(v.w)));
}
// END shared

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read_write> x: array<f32>;
@group(0) @binding(2) var<storage, read_write> w: array<u32>;

fn word(gid: vec3<u32>, nwg: vec3<u32>) -> u32 {
    return gid.x + gid.y * nwg.x * 256u;
}

// The word's two elements' bits (the second 0 past the end).
fn pair_bits(i: u32) -> vec2<u32> {
    let lo = bits(x[2u * i]);
    var hi = 0u;
    if 2u * i + 1u < p.n { hi = bits(x[2u * i + 1u]); }
    return vec2(lo, hi);
}

@compute @workgroup_size(256, 1, 1)
fn pack_words(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = word(gid, nwg);
    if 2u * i >= p.n { return; }
    let h = pair_bits(i);
    w[i] = h.x | (h.y << 16u);
}

@compute @workgroup_size(256, 1, 1)
fn unpack_words(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = word(gid, nwg);
    if 2u * i >= p.n { return; }
    let v = unpack4(vec2(w[i], 0u));
    x[2u * i] = v.x;
    if 2u * i + 1u < p.n { x[2u * i + 1u] = v.y; }
}

@compute @workgroup_size(256, 1, 1)
fn round_values(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = word(gid, nwg);
    if 2u * i >= p.n { return; }
    let v = values4(vec4(pair_bits(i), 0u, 0u));
    x[2u * i] = v.x;
    if 2u * i + 1u < p.n { x[2u * i + 1u] = v.y; }
}

@compute @workgroup_size(256, 1, 1)
fn round_pack(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = word(gid, nwg);
    if 2u * i >= p.n { return; }
    let h = pair_bits(i);
    w[i] = h.x | (h.y << 16u);
    let v = values4(vec4(h, 0u, 0u));
    x[2u * i] = v.x;
    if 2u * i + 1u < p.n { x[2u * i + 1u] = v.y; }
}

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

override FMT: u32 = 0u;

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read_write> x: array<f32>;
@group(0) @binding(2) var<storage, read_write> w: array<u32>;

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

fn f16_value(h: u32) -> f32 {
    let sign = (h & 0x8000u) << 16u;
    let e = (h >> 10u) & 0x1fu;
    let m = h & 0x3ffu;
    if e == 0u {
        // Zero or subnormal: m * 2^-24, exact in f32.
        return bitcast<f32>(sign | bitcast<u32>(ldexp(f32(m), -24)));
    }
    if e == 31u { return bitcast<f32>(sign | 0x7f800000u | (m << 13u)); }
    return bitcast<f32>(sign | ((e + 112u) << 23u) | (m << 13u));
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

fn value(h: u32) -> f32 {
    if FMT == 1u { return bitcast<f32>(h << 16u); }
    return f16_value(h);
}

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
    let v = w[i];
    x[2u * i] = value(v & 0xffffu);
    if 2u * i + 1u < p.n { x[2u * i + 1u] = value(v >> 16u); }
}

@compute @workgroup_size(256, 1, 1)
fn round_values(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = word(gid, nwg);
    if 2u * i >= p.n { return; }
    let h = pair_bits(i);
    x[2u * i] = value(h.x);
    if 2u * i + 1u < p.n { x[2u * i + 1u] = value(h.y); }
}

@compute @workgroup_size(256, 1, 1)
fn round_pack(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = word(gid, nwg);
    if 2u * i >= p.n { return; }
    let h = pair_bits(i);
    w[i] = h.x | (h.y << 16u);
    x[2u * i] = value(h.x);
    if 2u * i + 1u < p.n { x[2u * i + 1u] = value(h.y); }
}

// Pointwise activations and their derivatives:
//   kind 0: GELU, exact erf form (PyTorch nn.GELU, HF "gelu")
//   kind 1: QuickGELU x * sigmoid(1.702 x) (CLIP "quick_gelu")
//   kind 2: tanh (RoBERTa pooler)
//   kind 3: GELU, tanh approximation (HF "gelu_new" / "gelu_pytorch_tanh")
// WGSL has no erf, and tanh may be computed as (e^2x - 1) / (e^2x + 1),
// which overflows to NaN: both are implemented here.
//
// forward: x, y (out)        backward: x, dx (out), dy

struct Params { n: u32, kind: u32, _a: u32, _b: u32 }

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read_write> out: array<f32>;
@group(0) @binding(3) var<storage, read> dy: array<f32>;

// BEGIN shared with the matmul epilogue (build.rs copies it there)
const FRAC_1_SQRT_2: f32 = 0.70710678118654752;
const FRAC_1_SQRT_2PI: f32 = 0.39894228040143268;
const SQRT_2_OVER_PI: f32 = 0.79788456080286536;
const GELU_TANH_C: f32 = 0.044715;
const QUICK_GELU_C: f32 = 1.702;

// erfc(a) for a >= 0, about 2 ulp (erf to ~1e-7 absolute).
// a < 0.8: 1 - erf(a) from the Taylor series of erf(a) / a in a^2.
// a >= 0.8: erfc(a) = t R(t) exp(-a^2), t = 1 / (1 + a / 2), R a polynomial
// least-squares fitted (relative error) over t in (0, 1 / 1.4]; R(0) = 1/(2 sqrt(pi))
// matches the asymptote erfc(a) ~ exp(-a^2) / (a sqrt(pi)), so the fit holds
// for every a and exp underflows cleanly to 0.
fn erfc_pos(a: f32) -> f32 {
    if a < 0.8 {
        let z = a * a;
        var s = -1.6365844e-7;
        s = fma(s, z, 1.6462114e-6);
        s = fma(s, z, -1.4925650e-5);
        s = fma(s, z, 1.2055333e-4);
        s = fma(s, z, -8.5483270e-4);
        s = fma(s, z, 5.2239778e-3);
        s = fma(s, z, -2.6866172e-2);
        s = fma(s, z, 1.1283792e-1);
        s = fma(s, z, -3.7612638e-1);
        s = fma(s, z, 1.1283792);
        return 1.0 - a * s;
    }
    let t = 1.0 / fma(0.5, a, 1.0);
    var r = 1.4156892e-3;
    r = fma(r, t, -8.1953749e-2);
    r = fma(r, t, 2.5658327e-1);
    r = fma(r, t, -2.5168222e-1);
    r = fma(r, t, 2.7181927e-2);
    r = fma(r, t, -2.5796449e-2);
    r = fma(r, t, 8.7026656e-2);
    r = fma(r, t, 1.7602240e-1);
    r = fma(r, t, 2.4684560e-1);
    r = fma(r, t, 2.8209457e-1);
    r = fma(r, t, 2.8209481e-1);
    return t * r * exp(-a * a);
}

// Standard normal CDF, accurate in relative terms in the left tail.
fn phi(v: f32) -> f32 {
    let z = v * FRAC_1_SQRT_2;
    if z < 0.0 { return 0.5 * erfc_pos(-z); }
    return 1.0 - 0.5 * erfc_pos(z);
}

// tanh and its derivative 1 - tanh^2 without overflow or cancellation:
// with e = exp(-2|v|) <= 1 (it can only underflow), tanh = (1 - e) / (1 + e)
// and 1 - tanh^2 = 4e / (1 + e)^2. Small |v| uses the Taylor series so that
// tanh(v) ~ v keeps its relative accuracy.
fn tanh_parts(v: f32) -> vec2<f32> {
    let a = abs(v);
    if a < 0.25 {
        let z = v * v;
        var s = 62.0 / 2835.0;
        s = fma(s, z, -17.0 / 315.0);
        s = fma(s, z, 2.0 / 15.0);
        s = fma(s, z, -1.0 / 3.0);
        let t = v * fma(s, z, 1.0);
        return vec2(t, 1.0 - t * t);
    }
    let e = exp(-2.0 * a);
    let r = 1.0 / (1.0 + e);
    return vec2(sign(v) * (1.0 - e) * r, 4.0 * e * r * r);
}

// sigmoid(z) and its derivative s (1 - s), likewise from e = exp(-|z|).
fn sigmoid_parts(z: f32) -> vec2<f32> {
    let e = exp(-abs(z));
    let r = 1.0 / (1.0 + e);
    return vec2(select(e * r, r, z >= 0.0), e * r * r);
}

// tanh-GELU as x * sigmoid(2u) (= 0.5 x (1 + tanh u), without the
// cancellation of 1 + tanh u for negative u); du/dx alongside.
fn gelu_tanh_u(v: f32) -> vec2<f32> {
    let u = SQRT_2_OVER_PI * fma(GELU_TANH_C * v, v * v, v);
    let du = SQRT_2_OVER_PI * fma(3.0 * GELU_TANH_C * v, v, 1.0);
    return vec2(u, du);
}

fn act_kind(v: f32, kind: u32) -> f32 {
    switch kind {
        case 0u: { return v * phi(v); }
        case 1u: { return v * sigmoid_parts(QUICK_GELU_C * v).x; }
        case 2u: { return tanh_parts(v).x; }
        default: { return v * sigmoid_parts(2.0 * gelu_tanh_u(v).x).x; }
    }
}
fn act_grad_kind(v: f32, kind: u32) -> f32 {
    switch kind {
        // exp underflows to 0 before v * exp(...) could be inf * 0.
        case 0u: { return phi(v) + v * FRAC_1_SQRT_2PI * exp(-0.5 * v * v); }
        case 1u: {
            let s = sigmoid_parts(QUICK_GELU_C * v);
            return s.x + QUICK_GELU_C * v * s.y;
        }
        case 2u: { return tanh_parts(v).y; }
        default: {
            // Past |v| = 20 the slope is exactly 0 or 1 in f32, and du
            // would overflow for huge v (inf * 0).
            if abs(v) > 20.0 { return select(0.0, 1.0, v > 0.0); }
            let u = gelu_tanh_u(v);
            let s = sigmoid_parts(2.0 * u.x);
            return s.x + 2.0 * v * s.y * u.y;
        }
    }
}
// END shared

fn act(v: f32) -> f32 { return act_kind(v, p.kind); }
fn act_grad(v: f32) -> f32 { return act_grad_kind(v, p.kind); }


@compute @workgroup_size(256, 1, 1)
fn forward(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = gid.x + gid.y * nwg.x * 256u;
    if i >= p.n { return; }
    out[i] = act(x[i]);
}

@compute @workgroup_size(256, 1, 1)
fn backward(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = gid.x + gid.y * nwg.x * 256u;
    if i >= p.n { return; }
    out[i] = dy[i] * act_grad(x[i]);
}

// The same four values at a time (n % 4 == 0): llvmpipe loads a whole vec4
// in one per-lane loop, a quarter of the loads. Same bindings, as vec4s.
@group(0) @binding(1) var<storage, read> x4: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read_write> out4: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read> dy4: array<vec4<f32>>;

@compute @workgroup_size(256, 1, 1)
fn forward4(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = gid.x + gid.y * nwg.x * 256u;
    if i >= p.n / 4u { return; }
    let v = x4[i];
    out4[i] = vec4(act(v.x), act(v.y), act(v.z), act(v.w));
}

@compute @workgroup_size(256, 1, 1)
fn backward4(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = gid.x + gid.y * nwg.x * 256u;
    if i >= p.n / 4u { return; }
    let v = x4[i];
    out4[i] = dy4[i] * vec4(act_grad(v.x), act_grad(v.y), act_grad(v.z), act_grad(v.w));
}

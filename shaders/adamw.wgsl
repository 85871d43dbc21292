// AdamW as torch.optim.AdamW (_single_tensor_adamw, decoupled weight decay),
// in place on the parameter and its two moments, and the global gradient
// norm of torch.nn.utils.clip_grad_norm_, whose clip coefficient the step
// reads from the GPU (no readback). Entry points use binding prefixes of one
// list: norm {1,2}, step {1..5}.

struct Params {
    n: u32, has_clip: u32, decay: f32, w1: f32,
    b2: f32, w2: f32, step_size: f32, bc2_sqrt: f32,
    eps: f32, max_norm: f32, _a: u32, _b: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> g: array<f32>;           // gradient (or the partial sums of squares)
@group(0) @binding(2) var<storage, read_write> w: array<f32>;     // parameter (or [norm, coef])
@group(0) @binding(3) var<storage, read_write> m: array<f32>;     // exp_avg
@group(0) @binding(4) var<storage, read_write> v: array<f32>;     // exp_avg_sq
@group(0) @binding(5) var<storage, read> clip: array<f32>;        // [total_norm, coef] (optional)

// w = [sqrt(g[0]), min(1, max_norm / (total + 1e-6))] from the sum of
// squares of every gradient in g[0].
@compute @workgroup_size(1, 1, 1)
fn norm() {
    let total = sqrt(g[0]);
    w[0] = total;
    w[1] = min(1.0, p.max_norm / (total + 1e-6));
}

// One element: torch's order of operations, with the bias corrections done
// on the host (step_size = lr / (1 - b1^t), bc2_sqrt = sqrt(1 - b2^t)).
@compute @workgroup_size(256, 1, 1)
fn step(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = gid.x + gid.y * nwg.x * 256u;
    if i >= p.n { return; }
    var gi = g[i];
    if p.has_clip != 0u { gi = gi * clip[1]; }     // clip_grad_norm_: g *= coef
    let wi = w[i] * p.decay;                        // param.mul_(1 - lr * wd)
    var mi = m[i];                                  // exp_avg.lerp_(g, 1 - b1)
    if p.w1 < 0.5 {
        mi = mi + p.w1 * (gi - mi);
    } else {
        mi = gi - (gi - mi) * (1.0 - p.w1);
    }
    let vi = v[i] * p.b2 + p.w2 * gi * gi;          // exp_avg_sq.mul_(b2).addcmul_(g, g, 1 - b2)
    let denom = sqrt(vi) / p.bc2_sqrt + p.eps;      // (v.sqrt() / bc2_sqrt).add_(eps)
    m[i] = mi;
    v[i] = vi;
    w[i] = wi + (-p.step_size) * (mi / denom);      // param.addcdiv_(m, denom, -step_size)
}

// step, four elements at a time (n % 4 == 0; same operations per element,
// so the same bits): a quarter of llvmpipe's per-lane load loops.
@group(0) @binding(1) var<storage, read> g4: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read_write> w4: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read_write> m4: array<vec4<f32>>;
@group(0) @binding(4) var<storage, read_write> v4: array<vec4<f32>>;

@compute @workgroup_size(256, 1, 1)
fn step4(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = gid.x + gid.y * nwg.x * 256u;
    if i >= p.n / 4u { return; }
    var gi = g4[i];
    if p.has_clip != 0u { gi = gi * clip[1]; }
    let wi = w4[i] * p.decay;
    var mi = m4[i];
    if p.w1 < 0.5 {
        mi = mi + p.w1 * (gi - mi);
    } else {
        mi = gi - (gi - mi) * (1.0 - p.w1);
    }
    let vi = v4[i] * p.b2 + p.w2 * gi * gi;
    let denom = sqrt(vi) / p.bc2_sqrt + p.eps;
    m4[i] = mi;
    v4[i] = vi;
    w4[i] = wi + (-p.step_size) * (mi / denom);
}

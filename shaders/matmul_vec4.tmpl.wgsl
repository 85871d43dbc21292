//# Template of matmul_vec4.wgsl and matmul_sg.wgsl (lines starting //# are
//# left out): build/matmul_gen.rs fills in the placeholders and appends one
//# unrolled entry point per register tile; ACTIVATION is the part of
//# activation.wgsl between its BEGIN shared / END shared markers; OPERANDS
//# binds A and B as f32 or as packed 16-bit words (build.rs, `bindings`).
{{HEADER}}
// Batched matmul for CPU adapters (lavapipe): register-blocked, no workgroup
// memory, every load a vec4. Same Params and meaning as matmul.wgsl.
// Needs n % 4 == 0, A 4-aligned along the loaded axis (k, or m when
// TRANS_A) and, with TRANS_B, k % 4 == 0 and A not transposed (the host
// transposes B first otherwise); the host falls back to matmul_regs when the
// shapes do not allow vec4s.
//
// Why: llvmpipe (Mesa 22) turns each storage-buffer load into a loop over
// the SIMD lanes with a bounds check per lane, and loads all components of a
// vector inside one such loop. Loads, not FMAs, bound the speed, so each
// thread loads vec4s of both operands and reuses each value many times.
// Entry point matmul_vec4_RMxRV: each thread computes RM rows x 4*RV
// columns (column groups strided by 8); 8x8 threads per workgroup.

// The epilogue is chosen by override constants, so each pipeline holds only
// the code it runs (a runtime switch over every activation, inlined into each
// store, made the kernel several times larger and slower):
// HAS_BIAS: C += bias; ACCUMULATE: C += old C; ACT 1: aux = act(C) as
// well (a linear layer's bias + activation in one pass); ACT 3: C = act(C)
// instead (the same with no backward to keep C for); ACT 2: C *= act'(x)
// with x, the activation's input, in aux (the MLP backward's dH ->
// d(pre-activation) in the same pass). ACT_KIND: an activation of
// activation.wgsl. BIAS_GRAD (TRANS_A only): aux[i] = sum_k op(A)[i, k] as
// well, from the A loads the product makes anyway (with A = dY of a linear
// layer, its bias gradient). ROUND: C (and aux with ACT 1) rounded to the
// 16-bit format FMT, as autocast rounds a half-precision op's output.
// Params has_bias / accumulate (matmul.wgsl's runtime switches) are unused
// here.
// BEGIN shared with matmul_blocked (build.rs copies it there)
struct Params {
    m: u32, n: u32, k: u32, lda: u32,
    ldb: u32, ldc: u32, a_bs: u32, b_bs: u32,
    c_bs: u32, has_bias: u32, accumulate: u32, alpha: f32,
}

override TRANS_A: bool = false;
override TRANS_B: bool = false;
override HAS_BIAS: bool = false;
override ACCUMULATE: bool = false;
override ACT: u32 = 0u;
override ACT_KIND: u32 = 0u;
override BIAS_GRAD: bool = false;
override ROUND: bool = false;

@group(0) @binding(0) var<uniform> p: Params;
// A and B, read through ld_a / ld_b (vec4 i of the operand, i.e. elements
// 4i..4i+3): f32 arrays, or 16-bit values packed two a u32 word
// (--fp16/--bf16), unpacked exactly as they load.
{{OPERANDS}}
@group(0) @binding(3) var<storage, read> bias: array<vec4<f32>>;
@group(0) @binding(4) var<storage, read_write> c: array<vec4<f32>>;
@group(0) @binding(5) var<storage, read_write> aux: array<vec4<f32>>;

// Activation forward, copied from activation.wgsl by build.rs.
{{ACTIVATION}}

// C, bias and aux are vec4s too (n % 4 == 0): one per-lane load loop
// per four values instead of four. `bq` is the bias of column group j4
// (zero without one), loaded once per column group.
fn store4(base: u32, i: u32, j4: u32, v: vec4<f32>, bq: vec4<f32>) {
    store4_linear(base, i, j4, v, bq);
    if FINISH { finish4(base, i, j4); }
}

// The epilogue in two parts. An unrolled tile stores each of its
// accumulators with store4_linear (alpha, bias, accumulate), then runs
// finish4 (ROUND, the activation) over the tile in a loop: Mesa inlines
// every call before it drops the branches the constants rule out, so one
// inlined copy of the activations per store made a 24x2 tile's pipeline
// take 0.7 s to create on lavapipe instead of about 25 ms.
override FINISH: bool = ROUND || ACT != 0u;

fn store4_linear(base: u32, i: u32, j4: u32, v: vec4<f32>, bq: vec4<f32>) {
    if i >= p.m || j4 >= p.n / 4u { return; }
    var out = p.alpha * v + bq;
    let idx = base + i * (p.ldc / 4u) + j4;
    if ACCUMULATE { out += c[idx]; }
    c[idx] = out;
}

// C's element group (i, j4) as store4_linear left it, rounded and
// activated (the same invocation reads back what it wrote).
fn finish4(base: u32, i: u32, j4: u32) {
    if i >= p.m || j4 >= p.n / 4u { return; }
    let idx = base + i * (p.ldc / 4u) + j4;
    var out = c[idx];
    if ROUND { out = round4(out); }
    if ACT == 2u {
        let x = aux[idx];
        out *= vec4(act_grad_kind(x.x, ACT_KIND), act_grad_kind(x.y, ACT_KIND),
                    act_grad_kind(x.z, ACT_KIND), act_grad_kind(x.w, ACT_KIND));
    }
    if ACT == 1u || ACT == 3u {
        var y = vec4(act_kind(out.x, ACT_KIND), act_kind(out.y, ACT_KIND),
                     act_kind(out.z, ACT_KIND), act_kind(out.w, ACT_KIND));
        if ROUND { y = round4(y); }
        if ACT == 1u { aux[idx] = y; } else { out = y; }
    }
    if ROUND || ACT >= 2u { c[idx] = out; }
}
// END shared

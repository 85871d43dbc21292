//# Template of attention_fused.wgsl and attention_sg.wgsl (lines starting //#
//# are left out): build/attention_gen.rs fills in the placeholders and appends
//# the unrolled entry points, three per head size (and rows per thread); QKV
//# binds q, k and v as f32 or packed 16-bit words (build.rs, `bindings`).
{{GENERATED}}
//
// Fused attention per (batch, head), {{ROWS}}, head size DH in the
// entry point names (attn_fwd_DH, attn_dq_DH, attn_dkv_DH):
//   attn_fwd: O = softmax(scale Q K^T | mask) V with an online softmax; also
//             lse = max + log(sum) per query row (+1e30 for a row with no key).
//   attn_dq:  delta = rowsum(dO * O); dQ = scale sum_j dS_ij K_j with
//             P recomputed from lse and dS = P (dO V^T - delta).
//   attn_dkv: dV_j = sum_i P_ij dO_i, dK_j = scale sum_i dS_ij Q_i.
// Masks: causal (key j <= query i) and key_valid [B, T] (0 masks a key).
// q/k/v/O/dO/dQ/dK/dV are [B, T, H*DH] as vec4s; lse/delta are [B, H, T].

// BEGIN shared with attention_tiled (build.rs copies it there)
struct Params {
    b: u32, t: u32, h: u32, d4: u32,
    causal: u32, has_kv: u32, scale: f32, nblk: u32,
    total: u32, _a: u32, _b: u32, _c: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
// q, k and v through ld_q / ld_k / ld_v (vec4 i): f32 arrays, or 16-bit
// values packed two a u32 word (--fp16/--bf16) unpacked as they load.
{{QKV}}
@group(0) @binding(4) var<storage, read> kv: array<f32>;
@group(0) @binding(5) var<storage, read_write> lse: array<f32>;
// attn_fwd
@group(0) @binding(6) var<storage, read_write> o_out: array<vec4<f32>>;
// attn_dq
@group(0) @binding(6) var<storage, read> o_in: array<vec4<f32>>;
@group(0) @binding(7) var<storage, read> d_o: array<vec4<f32>>;
@group(0) @binding(8) var<storage, read_write> delta_out: array<f32>;
@group(0) @binding(9) var<storage, read_write> dq: array<vec4<f32>>;
// attn_dkv
@group(0) @binding(6) var<storage, read> d_o2: array<vec4<f32>>;
@group(0) @binding(7) var<storage, read> delta_in: array<f32>;
@group(0) @binding(8) var<storage, read_write> dk: array<vec4<f32>>;
@group(0) @binding(9) var<storage, read_write> dv: array<vec4<f32>>;

fn key_ok(b: u32, j: u32) -> bool {
    return p.has_kv == 0u || kv[b * p.t + j] != 0.0;
}
// END shared

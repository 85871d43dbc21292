//! Every WGSL source the crate embeds, by name. Most are hand-written files
//! in shaders/; the unrolled CPU matmul and fused attention kernels are
//! written into OUT_DIR by build.rs, from templates in shaders/.

/// A hand-written shader, shaders/`name`.wgsl.
macro_rules! hand_written {
    ($name:literal) => {
        ($name, include_str!(concat!("../shaders/", $name, ".wgsl")))
    };
}

/// A shader build.rs generates.
macro_rules! generated {
    ($name:literal) => {
        (
            $name,
            include_str!(concat!(env!("OUT_DIR"), "/", $name, ".wgsl")),
        )
    };
}

/// (name, WGSL source) of every shader: what `shader!` looks names up in,
/// and what tests/shaders.rs validates.
pub const ALL: &[(&str, &str)] = &[
    hand_written!("accumulate"),
    hand_written!("activation"),
    hand_written!("adamw"),
    hand_written!("calibrate"),
    hand_written!("clamp"),
    hand_written!("convert"),
    hand_written!("class_pos"),
    hand_written!("elementwise"),
    hand_written!("embedding"),
    hand_written!("l2norm"),
    hand_written!("layernorm"),
    hand_written!("loss"),
    hand_written!("loss_blocked"),
    hand_written!("loss_local"),
    hand_written!("matmul"),
    hand_written!("patch"),
    hand_written!("permute"),
    hand_written!("permute_vec4"),
    hand_written!("positions"),
    hand_written!("reduce"),
    hand_written!("softmax"),
    hand_written!("topk"),
    generated!("attention_fused"),
    generated!("attention_fused_h16"),
    generated!("attention_sg"),
    generated!("attention_sg_h16"),
    generated!("attention_tiled"),
    generated!("attention_tiled_h16"),
    generated!("matmul_blocked"),
    generated!("matmul_blocked_b16"),
    generated!("matmul_blocked_ab16"),
    generated!("matmul_coop8"),
    generated!("matmul_coop8_ab16"),
    generated!("matmul_coop16"),
    generated!("matmul_coop16_ab16"),
    generated!("matmul_sg"),
    generated!("matmul_sg_b16"),
    generated!("matmul_sg_ab16"),
    generated!("matmul_vec4"),
    generated!("matmul_vec4_b16"),
    generated!("matmul_vec4_ab16"),
];

/// The source of shader `name`. A const fn so that `shader!` looks it up
/// at compile time: an unknown name fails the build.
pub const fn source(name: &str) -> &'static str {
    let mut i = 0;
    while i < ALL.len() {
        if bytes_eq(ALL[i].0.as_bytes(), name.as_bytes()) {
            return ALL[i].1;
        }
        i += 1;
    }
    panic!("no shader of that name in shaders::ALL")
}

/// `a == b` (slice comparison is not const).
const fn bytes_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let mut i = 0;
    while i < a.len() {
        if a[i] != b[i] {
            return false;
        }
        i += 1;
    }
    true
}

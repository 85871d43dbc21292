//! Kernels. Each module holds one op family: the GPU launch of its forward
//! and backward (WGSL in `crate::shaders`), its tape wrapper, and a
//! plain-Rust f64 CPU reference (`*_ref`) that the tests check the GPU and
//! finite differences against.

pub mod activation;
pub mod adamw;
pub mod attention;
pub mod attention_fused;
pub mod calibrate;
pub mod clamp;
pub mod convert;
pub mod elementwise;
pub mod embedding;
pub mod l2norm;
pub mod layernorm;
pub mod loss;
pub mod loss_blocked;
pub mod loss_local;
pub mod matmul;
pub mod mlp;
pub mod patch;
pub mod permute;
pub mod positions;
pub mod reduce;
pub mod softmax;
pub mod topk;

/// The entry point for data that is whole vec4s (`{entry}4`, four values a
/// thread: a quarter of llvmpipe's per-lane load loops) or not (`entry`, one
/// value a thread), and the values a thread takes.
pub(crate) fn by_vec4(whole: bool, entry: &str) -> (String, usize) {
    if whole {
        (format!("{entry}4"), 4)
    } else {
        (entry.to_string(), 1)
    }
}

/// f32 parameter as the u32 bits a WGSL `f32` field reads.
pub(crate) fn f(x: f32) -> u32 {
    x.to_bits()
}

/// `usize` as a u32 kernel parameter.
pub(crate) fn u(x: usize) -> u32 {
    u32::try_from(x).expect("size fits in u32")
}

/// The shader of that name in `crate::shaders` (looked up at compile time).
macro_rules! shader {
    ($name:literal) => {
        $crate::gpu::Shader {
            name: $name,
            source: const { $crate::shaders::source($name) },
        }
    };
}
pub(crate) use shader;

//! clip-wgpu: train CLIP-style image-text models on any GPU wgpu reaches,
//! with every kernel (forward and backward) hand-written in WGSL.

pub mod arith;
pub mod bench;
pub mod data;
pub mod dist;
pub mod embed;
pub mod gpu;
pub mod index;
pub mod model;
pub mod ops;
pub mod precision;
pub mod shaders;
pub mod tape;
pub mod tensor;
pub mod train;
pub mod zeroshot;

pub use gpu::Gpu;
pub use tape::{Grads, Tape, Var};
pub use tensor::Tensor;

/// Print `line` and a newline to stderr in one write: several processes
/// (mpirun's ranks) share one stderr, and `eprintln!` writes a formatted
/// line in pieces that another process's output can land between.
pub fn stderr_line(line: &str) {
    use std::io::Write;
    let mut buf = String::with_capacity(line.len() + 1);
    buf.push_str(line);
    buf.push('\n');
    let _ = std::io::stderr().lock().write_all(buf.as_bytes());
}

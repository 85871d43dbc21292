//! clip-wgpu: train CLIP-style image-text models on any GPU wgpu reaches,
//! with every kernel (forward and backward) hand-written in WGSL.

pub mod bench;
pub mod data;
pub mod dist;
pub mod embed;
pub mod gpu;
pub mod model;
pub mod ops;
pub mod tape;
pub mod tensor;
pub mod train;

pub use gpu::Gpu;
pub use tape::{Grads, Tape, Var};
pub use tensor::Tensor;

//! Data front end: images and captions turned into model inputs exactly as
//! Hugging Face transformers does it, so that a checkpoint trained or
//! evaluated here sees the same numbers it would see in transformers.
//!
//! - [`image`]: `CLIPImageProcessor` (RGB conversion, PIL's bicubic resize,
//!   center crop, rescale, normalize) reimplemented bit for bit.
//! - [`jpeg`]: a JPEG decoder matching libjpeg-turbo (PIL's decoder) exactly.
//! - [`text`]: the `tokenizers` crate driven the way transformers' fast
//!   tokenizers drive it (`padding="max_length"`, `truncation=True`).
//! - [`webdataset`]: WebDataset tar shards, streamed with a bounded shuffle
//!   buffer (training) or indexed in order (evaluation).

pub mod demo;
pub mod image;
pub mod jpeg;
pub mod loader;
pub mod sources;
pub mod text;
pub mod webdataset;

pub use self::image::{load_image, preprocess, ImageProcessorConfig};
pub use self::text::TextTokenizer;

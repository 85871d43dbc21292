//! What the loader tests share: CLIP's tokenizer from assets, a small
//! picture processor and a loader configuration.

use clip_wgpu::data::image::ImageProcessorConfig;
use clip_wgpu::data::loader::LoaderConfig;
use clip_wgpu::data::TextTokenizer;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

/// CLIP's tokenizer (assets/clip-tokenizer), loaded once per test binary.
pub fn tokenizer() -> Arc<TextTokenizer> {
    static TOK: OnceLock<Arc<TextTokenizer>> = OnceLock::new();
    TOK.get_or_init(|| {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("assets/clip-tokenizer");
        Arc::new(TextTokenizer::from_model_dir(&dir).unwrap())
    })
    .clone()
}

/// 32x32 crops.
pub fn processor() -> ImageProcessorConfig {
    ImageProcessorConfig {
        shortest_edge: 32,
        crop_h: 32,
        crop_w: 32,
        ..Default::default()
    }
}

/// Batches of `batch_size`, text cut at 16 tokens, refilled past bad pictures.
pub fn loader_cfg(batch_size: usize, workers: usize) -> LoaderConfig {
    LoaderConfig {
        batch_size,
        max_len: 16,
        workers,
        prefetch: 2,
        drop_last: false,
        refill: true,
    }
}

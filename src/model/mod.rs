//! CLIP and CLIP-vision + RoBERTa models: configs, weights, towers.

pub mod clip;
pub mod clip_text;
pub mod config;
pub mod init;
pub mod layers;
pub mod params;
pub mod prepare;
pub mod recompute;
pub mod roberta;
pub mod vision;
pub mod weights;

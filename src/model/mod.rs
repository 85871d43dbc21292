//! CLIP and CLIP-vision + RoBERTa models: configs, weights, towers.

pub mod config;
pub mod weights;
pub mod clip;
pub mod clip_text;
pub mod layers;
pub mod params;
pub mod roberta;
pub mod vision;

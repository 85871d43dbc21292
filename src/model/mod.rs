//! CLIP and CLIP-vision + RoBERTa models: configs, weights, towers.

pub mod config;
pub mod weights;

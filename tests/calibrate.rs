//! The bench's peak-calibration kernels compute what their CPU references
//! say (so the timed work is real work), at sizes not multiples of 64.
mod common;
use clip_wgpu::ops::calibrate::{copy_peak, fma_peak, fma_peak_ref};
use clip_wgpu::Tensor;
use common::*;

#[test]
fn fma_peak_matches_reference() {
    let Some(gpu) = gpu() else { return };
    let (n, iters) = (1000, 37);
    let out = Tensor::zeros(&gpu, &[4 * n]).unwrap();
    let flops = fma_peak(&out, n, iters).unwrap();
    assert_eq!(flops, (n * iters * 64) as f64);
    let got = out.to_vec().unwrap();
    let mut worst = 0.0f64;
    for i in 0..n {
        let want = fma_peak_ref(i, iters);
        for e in 0..4 {
            let (g, w) = (got[4 * i + e] as f64, want[e] as f64);
            worst = worst.max((g - w).abs() / (1.0 + w.abs()));
        }
    }
    eprintln!("fma_peak: max error {worst:.3e}");
    assert!(
        worst < 1e-5,
        "fma_peak differs from its reference by {worst:e}"
    );
}

#[test]
fn copy_peak_copies() {
    let Some(gpu) = gpu() else { return };
    let src: Vec<f32> = (0..4 * 1001).map(|i| i as f32 * 0.5 - 3.0).collect();
    let s = Tensor::from_slice(&gpu, &src, &[src.len()]).unwrap();
    let d = Tensor::zeros(&gpu, &[src.len()]).unwrap();
    assert_eq!(copy_peak(&d, &s).unwrap(), (2 * 16 * 1001) as f64);
    assert_eq!(d.to_vec().unwrap(), src);
}

//! Shared test helpers: one GPU per test binary, a seeded RNG, comparisons
//! and central finite differences in f64.
#![allow(dead_code)]

pub mod cli;

use clip_wgpu::gpu::AdapterRequest;
use clip_wgpu::{Gpu, Tensor};
use std::sync::{Arc, OnceLock};

/// The test GPU, or `None` (test skipped) when no adapter exists outside CI.
/// Under `CI=true` a missing adapter fails the test.
pub fn gpu() -> Option<Arc<Gpu>> {
    static GPU: OnceLock<Option<Arc<Gpu>>> = OnceLock::new();
    GPU.get_or_init(
        || match Gpu::new(&AdapterRequest::default().with_env().unwrap()) {
            Ok(g) => Some(g),
            Err(e) => {
                if std::env::var("CI").is_ok_and(|v| v == "true" || v == "1") {
                    panic!("CI=true but no GPU adapter: {e:#}");
                }
                eprintln!("skipping GPU test: {e:#}");
                None
            }
        },
    )
    .clone()
}

/// A GPU context of this test's own (pool statistics not shared with
/// tests running in parallel).
pub fn own_gpu() -> Option<Arc<Gpu>> {
    gpu()?;
    Some(Gpu::new(&AdapterRequest::default().with_env().unwrap()).unwrap())
}

/// splitmix64: small, seeded, reproducible.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E3779B97F4A7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58476D1CE4E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D049BB133111EB);
        z ^ (z >> 31)
    }
    /// Uniform in [-1, 1).
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0
    }
    /// n values in [-scale, scale), already rounded to f32.
    pub fn vec(&mut self, n: usize, scale: f64) -> Vec<f64> {
        (0..n)
            .map(|_| (self.uniform() * scale) as f32 as f64)
            .collect()
    }
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
}

pub fn to_f32(x: &[f64]) -> Vec<f32> {
    x.iter().map(|&v| v as f32).collect()
}

pub fn upload(gpu: &Arc<Gpu>, x: &[f64], shape: &[usize]) -> Tensor {
    Tensor::from_slice(gpu, &to_f32(x), shape).unwrap()
}

pub fn download(t: &Tensor) -> Vec<f64> {
    t.to_vec().unwrap().into_iter().map(|v| v as f64).collect()
}

/// max |a - b| / (1 + |b|) over all elements: relative for large values,
/// absolute near zero.
pub fn max_err(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs() / (1.0 + y.abs()))
        .fold(0.0, f64::max)
}

/// Assert GPU output `got` matches reference `want` within `tol`, and
/// report the figure (collected by the test log).
pub fn assert_close(what: &str, got: &[f64], want: &[f64], tol: f64) {
    let e = max_err(got, want);
    eprintln!("{what}: max error {e:.3e}");
    assert!(
        got.iter().all(|v| v.is_finite()),
        "{what}: non-finite output"
    );
    assert!(e <= tol, "{what}: max error {e:.3e} > {tol:.1e}");
}

/// Central finite differences of the scalar function `loss` at `x`,
/// directional: returns d loss / dx_i for every i.
pub fn numeric_grad(x: &[f64], mut loss: impl FnMut(&[f64]) -> f64) -> Vec<f64> {
    let h = 1e-6;
    let mut xp = x.to_vec();
    (0..x.len())
        .map(|i| {
            let orig = xp[i];
            xp[i] = orig + h;
            let lp = loss(&xp);
            xp[i] = orig - h;
            let lm = loss(&xp);
            xp[i] = orig;
            (lp - lm) / (2.0 * h)
        })
        .collect()
}

/// Check an analytic gradient against finite differences with a random
/// projection as the loss: L = sum_i w_i f(x)_i.
pub fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

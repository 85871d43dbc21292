//! Shared test helpers: one GPU per test binary, a seeded RNG, comparisons
//! and central finite differences in f64.
#![allow(dead_code)]

pub mod cli;
pub mod loading;

use clip_wgpu::gpu::AdapterRequest;
use clip_wgpu::model::clip::{Batch, ClipModel};
use clip_wgpu::model::config::ModelConfig;
use clip_wgpu::model::init::init_weights;
use clip_wgpu::{Gpu, Tape, Tensor};
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

/// The test GPU, or `None` (test skipped) when no adapter exists outside CI.
/// Under `CI=true` a missing adapter fails the test.
pub fn gpu() -> Option<Arc<Gpu>> {
    static GPU: OnceLock<Option<Arc<Gpu>>> = OnceLock::new();
    GPU.get_or_init(
        || match Gpu::new(&AdapterRequest::default().with_env().unwrap()) {
            Ok(g) => {
                check_backend(&g);
                Some(g)
            }
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

/// With `CLIP_WGPU_BACKEND` set (CI runs a second pass on GL), the tests
/// must really run on that backend.
pub fn check_backend(g: &Gpu) {
    if let Ok(want) = std::env::var("CLIP_WGPU_BACKEND") {
        if want != "all" && !want.is_empty() {
            let got = format!("{:?}", g.info.backend).to_lowercase();
            assert_eq!(got, want.to_lowercase(), "tests asked for backend {want}");
        }
    }
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

/// tests/fixtures.
pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// The transformers-made model of fixture `kind` (`clip`, `clip_roberta`):
/// tests/fixtures/KIND/model.
pub fn fixture_model(kind: &str) -> PathBuf {
    fixtures().join(kind).join("model")
}

/// Copy the files of folder `src` (a model folder) into `dst`.
pub fn copy_dir(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    for e in std::fs::read_dir(src).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dst.join(e.file_name())).unwrap();
    }
}

/// A randomly initialised model (`init_weights` with `seed`) of the config
/// `case` of tests/fixtures/init: `clip`, `dual_roberta`, ...
pub fn init_model(gpu: &Arc<Gpu>, case: &str, seed: u64) -> ClipModel {
    let dir = fixtures().join("init").join(case);
    let cfg = ModelConfig::from_file(&dir.join("config.json")).unwrap();
    let w = init_weights(&cfg, seed).unwrap();
    ClipModel::from_weights(gpu, cfg, &w, case).unwrap()
}

/// One row of a text batch for an `init_model` of `case`: a caption of `n`
/// tokens in `ids` and `mask` (the rest left as padding): CLIP's ends with
/// end-of-text (199), RoBERTa's is <s> .. </s>, random tokens between.
pub fn caption(case: &str, ids: &mut [u32], mask: &mut [f32], n: usize, r: &mut Rng) {
    for t in 0..n {
        ids[t] = match (case, t) {
            ("clip", t) if t == n - 1 => 199,
            ("dual_roberta", 0) => 0,
            ("dual_roberta", t) if t == n - 1 => 2,
            _ => 3 + r.below(190) as u32,
        };
        mask[t] = 1.0;
    }
}

/// Loss and gradients (store order; empty where a parameter gets none) of
/// one ordinary step of `model` on `b`.
pub fn loss_and_grads(model: &ClipModel, b: &Batch) -> (f64, Vec<Vec<f64>>) {
    let mut tape = Tape::new();
    let vars = model.params.vars(&mut tape);
    let out = model.forward(&mut tape, &vars, b).unwrap();
    let loss = download(out.loss.tensor())[0];
    let mut g = tape.backward(&out.loss).unwrap();
    (loss, host_grads(model.params.grads(&vars, &mut g)))
}

/// Gradients on the host (empty where there is none).
pub fn host_grads(grads: Vec<Option<Tensor>>) -> Vec<Vec<f64>> {
    grads
        .iter()
        .map(|t| t.as_ref().map_or(Vec::new(), download))
        .collect()
}

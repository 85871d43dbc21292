//! Kernel benchmarks shared by `clip-wgpu bench` and `cargo bench`: each
//! case runs a kernel a few times and reports the median wall time around
//! submit + wait, with its arithmetic rate.

use crate::gpu::Gpu;
use crate::ops::matmul::{gemm_into, Gemm, Variant};
use crate::tensor::Tensor;
use anyhow::Result;
use std::sync::Arc;
use std::time::Instant;

pub struct Measure {
    pub kernel: String,
    pub shape: String,
    pub median_ms: f64,
    /// GFLOP/s for compute-bound kernels, else GB/s of memory traffic.
    pub rate: f64,
    pub unit: &'static str,
}

impl Measure {
    pub fn json(&self) -> String {
        format!(
            "{{\"kernel\":\"{}\",\"shape\":\"{}\",\"median_ms\":{:.4},\"rate\":{:.3},\"unit\":\"{}\"}}",
            self.kernel, self.shape, self.median_ms, self.rate, self.unit
        )
    }
}

/// Median seconds of `reps` timed runs after one warm-up run.
pub fn time(gpu: &Gpu, reps: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    f()?;
    gpu.sync()?;
    let mut ts = Vec::with_capacity(reps);
    for _ in 0..reps {
        let t = Instant::now();
        f()?;
        gpu.sync()?;
        ts.push(t.elapsed().as_secs_f64());
    }
    ts.sort_by(|a, b| a.total_cmp(b));
    Ok(ts[ts.len() / 2])
}

/// Deterministic filler in [-1, 1).
fn filler(n: usize) -> Vec<f32> {
    (0..n).map(|i| ((i * 7919 % 2003) as f32 / 1001.5) - 1.0).collect()
}

pub fn matmul_case(gpu: &Arc<Gpu>, label: &str, g: Gemm, reps: usize) -> Result<Measure> {
    let a_len = g.batch * g.m * g.k;
    let b_len = g.batch * g.k * g.n;
    let a = Tensor::from_slice(gpu, &filler(a_len), &[a_len])?;
    let b = Tensor::from_slice(gpu, &filler(b_len), &[b_len])?;
    let c = Tensor::empty(gpu, &[g.batch, g.m, g.n])?;
    let t = time(gpu, reps, || gemm_into(&c, &a, &b, None, g))?;
    let variant = g.variant.unwrap_or_else(|| Variant::for_class(gpu.class));
    Ok(Measure {
        kernel: format!("matmul {label} ({variant:?})"),
        shape: format!(
            "{}x{}x{}x{}{}{}",
            g.batch,
            g.m,
            g.n,
            g.k,
            if g.ta { " ta" } else { "" },
            if g.tb { " tb" } else { "" }
        ),
        median_ms: t * 1e3,
        rate: g.flops() / t / 1e9,
        unit: "GFLOP/s",
    })
}

/// The kernel table: the 1024^3 reference matmul in each transpose mode,
/// then the shapes of the demo model's training step at `batch`.
pub fn kernel_table(gpu: &Arc<Gpu>, batch: usize, reps: usize) -> Result<Vec<Measure>> {
    let mut out = Vec::new();
    for (label, ta, tb) in [("NN", false, false), ("NT", false, true), ("TN", true, false)] {
        let g = Gemm::new(1, 1024, 1024, 1024).ta(ta).tb(tb);
        out.push(matmul_case(gpu, &format!("1024^3 {label}"), g, reps)?);
    }
    // The demo model: width 128, MLP 512, 65 vision tokens, 77 text tokens.
    let rows = batch * 77;
    out.push(matmul_case(gpu, "text qkv", Gemm::new(1, rows, 128, 128).tb(true), reps)?);
    out.push(matmul_case(gpu, "text fc1", Gemm::new(1, rows, 512, 128).tb(true), reps)?);
    out.push(matmul_case(gpu, "text fc2", Gemm::new(1, rows, 128, 512).tb(true), reps)?);
    out.push(matmul_case(gpu, "text dW fc1", Gemm::new(1, 512, 128, rows).ta(true), reps)?);
    out.push(matmul_case(
        gpu,
        "text scores",
        Gemm::new(batch * 4, 77, 77, 32).tb(true),
        reps,
    )?);
    Ok(out)
}

pub fn print_table(rows: &[Measure]) {
    println!("{:<34} {:>22} {:>12} {:>14}", "kernel", "shape", "median ms", "rate");
    for m in rows {
        println!(
            "{:<34} {:>22} {:>12.3} {:>8.2} {}",
            m.kernel, m.shape, m.median_ms, m.rate, m.unit
        );
    }
}

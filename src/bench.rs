//! Kernel benchmarks shared by `clip-wgpu bench` and `cargo bench`: each
//! case runs a kernel a few times and reports the median wall time around
//! submit + wait, with its arithmetic rate.

use crate::gpu::{Gpu, KernelTime};
use crate::model::clip::{Batch, ClipModel};
use crate::model::config::ModelConfig;
use crate::model::params::decays;
use crate::model::weights::{HostTensor, Weights};
use crate::ops::activation::{self, Act};
use crate::ops::adamw::{self, AdamW};
use crate::ops::matmul::{chosen_variant, gemm_into, Gemm};
use crate::ops::softmax::{self, Mask};
use crate::ops::{layernorm, loss};
use crate::tape::Tape;
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
    (0..n)
        .map(|i| ((i * 7919 % 2003) as f32 / 1001.5) - 1.0)
        .collect()
}

pub fn matmul_case(gpu: &Arc<Gpu>, label: &str, g: Gemm, reps: usize) -> Result<Measure> {
    let a_len = g.batch * g.m * g.k;
    let b_len = g.batch * g.k * g.n;
    let a = Tensor::from_slice(gpu, &filler(a_len), &[a_len])?;
    let b = Tensor::from_slice(gpu, &filler(b_len), &[b_len])?;
    let c = Tensor::empty(gpu, &[g.batch, g.m, g.n])?;
    let t = time(gpu, reps, || gemm_into(&c, &a, &b, None, g))?;
    let variant = chosen_variant(&g, gpu.class, g.m * g.k, g.k * g.n);
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
    for (label, ta, tb) in [
        ("NN", false, false),
        ("NT", false, true),
        ("TN", true, false),
    ] {
        let g = Gemm::new(1, 1024, 1024, 1024).ta(ta).tb(tb);
        out.push(matmul_case(gpu, &format!("1024^3 {label}"), g, reps)?);
    }
    // The demo model: width 128, MLP 512, 65 vision tokens, 77 text tokens.
    let rows = batch * 77;
    out.push(matmul_case(
        gpu,
        "text qkv",
        Gemm::new(1, rows, 128, 128).tb(true),
        reps,
    )?);
    out.push(matmul_case(
        gpu,
        "text fc1",
        Gemm::new(1, rows, 512, 128).tb(true),
        reps,
    )?);
    out.push(matmul_case(
        gpu,
        "text fc2",
        Gemm::new(1, rows, 128, 512).tb(true),
        reps,
    )?);
    out.push(matmul_case(
        gpu,
        "text dW fc1",
        Gemm::new(1, 512, 128, rows).ta(true),
        reps,
    )?);
    out.push(matmul_case(
        gpu,
        "text scores",
        Gemm::new(batch * 4, 77, 77, 32).tb(true),
        reps,
    )?);
    out.extend(elementwise_cases(gpu, batch, reps)?);
    Ok(out)
}

/// A memory-bound case: `bytes` moved per run.
fn mem_case(
    gpu: &Gpu,
    kernel: &str,
    shape: String,
    bytes: f64,
    reps: usize,
    f: impl FnMut() -> Result<()>,
) -> Result<Measure> {
    let t = time(gpu, reps, f)?;
    Ok(Measure {
        kernel: kernel.to_string(),
        shape,
        median_ms: t * 1e3,
        rate: bytes / t / 1e9,
        unit: "GB/s",
    })
}

fn tensor(gpu: &Arc<Gpu>, shape: &[usize]) -> Result<Tensor> {
    let n = shape.iter().product();
    Tensor::from_slice(gpu, &filler(n), shape)
}

/// Row-wise and elementwise kernels at the demo model's text shapes.
fn elementwise_cases(gpu: &Arc<Gpu>, batch: usize, reps: usize) -> Result<Vec<Measure>> {
    let (rows, d, f) = (batch * 77, 128, 512);
    let x = tensor(gpu, &[rows, d])?;
    let g = tensor(gpu, &[d])?;
    let bta = tensor(gpu, &[d])?;
    let mut out = Vec::new();
    let b = (rows * d * 4) as f64;
    out.push(mem_case(
        gpu,
        "layernorm fwd",
        format!("{rows}x{d}"),
        2.0 * b,
        reps,
        || layernorm::forward(&x, &g, &bta, 1e-5).map(drop),
    )?);
    let (_, mean, rstd) = layernorm::forward(&x, &g, &bta, 1e-5)?;
    out.push(mem_case(
        gpu,
        "layernorm bwd",
        format!("{rows}x{d}"),
        4.0 * b,
        reps,
        || layernorm::backward(&x, &x, &g, &mean, &rstd).map(drop),
    )?);
    let h = tensor(gpu, &[rows, f])?;
    let hb = (rows * f * 4) as f64;
    for a in [Act::QuickGelu, Act::Gelu] {
        out.push(mem_case(
            gpu,
            &format!("{a:?} fwd"),
            format!("{rows}x{f}"),
            2.0 * hb,
            reps,
            || activation::forward(&h, a).map(drop),
        )?);
        out.push(mem_case(
            gpu,
            &format!("{a:?} bwd"),
            format!("{rows}x{f}"),
            3.0 * hb,
            reps,
            || activation::backward(&h, &h, a).map(drop),
        )?);
    }
    let heads = 4;
    let s = tensor(gpu, &[batch, heads, 77, 77])?;
    let valid = Tensor::from_slice(gpu, &vec![1.0; batch * 77], &[batch, 77])?;
    let mask = Mask {
        causal: true,
        key_valid: Some(valid),
        keys: None,
    };
    let sb = (s.numel() * 4) as f64;
    let shape = format!("{batch}x{heads}x77x77");
    out.push(mem_case(
        gpu,
        "softmax fwd (causal+pad)",
        shape.clone(),
        2.0 * sb,
        reps,
        || softmax::forward(&s, &mask).map(drop),
    )?);
    let p = softmax::forward(&s, &mask)?;
    out.push(mem_case(gpu, "softmax bwd", shape, 3.0 * sb, reps, || {
        softmax::backward(&p, &s).map(drop)
    })?);
    let (ie, te) = (tensor(gpu, &[batch, 128])?, tensor(gpu, &[batch, 128])?);
    let scale = Tensor::scalar(gpu, 2.6592)?;
    out.push(mem_case(
        gpu,
        "contrastive loss fwd",
        format!("{batch}x128"),
        2.0 * (batch * 128 * 4) as f64,
        reps,
        || loss::clip_loss_forward(&ie, &te, &scale).map(drop),
    )?);
    let n = 49408 * 128;
    let (pw, gw, m, v) = (
        tensor(gpu, &[n])?,
        tensor(gpu, &[n])?,
        tensor(gpu, &[n])?,
        tensor(gpu, &[n])?,
    );
    let hp = AdamW::default();
    let mut step = 0;
    out.push(mem_case(
        gpu,
        "adamw (token embedding)",
        format!("{n}"),
        7.0 * (n * 4) as f64,
        reps,
        || {
            step += 1;
            adamw::adamw_step(&pw, &gw, &m, &v, step, &hp, true, None)
        },
    )?);
    Ok(out)
}

/// The demo model of `clip-wgpu train` (issue: vision 64 px, patch 8, width
/// 128, 4 layers, 4 heads, MLP 512; text the same with 77 positions and
/// CLIP's 49,408-token vocabulary; projection 128; quick_gelu).
pub fn tiny_config() -> ModelConfig {
    let v = serde_json::json!({
        "model_type": "clip",
        "projection_dim": 128,
        "logit_scale_init_value": 2.6592,
        "vision_config": {"hidden_size": 128, "intermediate_size": 512, "num_hidden_layers": 4,
            "num_attention_heads": 4, "image_size": 64, "patch_size": 8, "hidden_act": "quick_gelu"},
        "text_config": {"hidden_size": 128, "intermediate_size": 512, "num_hidden_layers": 4,
            "num_attention_heads": 4, "max_position_embeddings": 77, "vocab_size": 49408,
            "hidden_act": "quick_gelu", "eos_token_id": 49407}
    });
    ModelConfig::from_value(v, "tiny config").expect("valid built-in config")
}

pub struct StepTimes {
    pub forward_ms: f64,
    pub backward_ms: f64,
    pub optimizer_ms: f64,
    pub images_per_s: f64,
    pub peak_pool_mib: f64,
    pub allocations_after_first_step: u64,
    /// GPU time per kernel over one more (profiled) step.
    pub kernels: Vec<KernelTime>,
}

/// Median forward / backward / AdamW times of one training step of `config`
/// at `batch` (deterministic filler weights and inputs; text padded to 77).
pub fn training_step(
    gpu: &Arc<Gpu>,
    config: ModelConfig,
    batch: usize,
    reps: usize,
) -> Result<StepTimes> {
    let mut w = Weights::default();
    for (name, shape) in ClipModel::expected_tensors(&config)? {
        let n: usize = shape.iter().product();
        let data = if name.ends_with("weight") && shape.len() == 1 {
            vec![1.0; n] // LayerNorm gains
        } else if name == "logit_scale" {
            vec![2.6592]
        } else {
            filler(n).into_iter().map(|x| 0.02 * x).collect()
        };
        w.tensors.insert(name, HostTensor::new(&shape, data));
    }
    let model = ClipModel::from_weights(gpu, config, &w, "benchmark weights")?;
    let s = model.config.vision.image_size;
    let len = model.config.text.max_positions().min(77);
    let pixels = Tensor::from_slice(gpu, &filler(batch * 3 * s * s), &[batch, 3, s, s])?;
    let ids: Vec<u32> = (0..batch * len)
        .map(|i| {
            if i % len == len / 2 {
                49407
            } else {
                (i * 37 % 40000) as u32
            }
        })
        .collect();
    let mask: Vec<f32> = (0..batch * len)
        .map(|i| (i % len <= len / 2) as u8 as f32)
        .collect();
    let b = Batch {
        pixels,
        ids,
        mask,
        batch,
    };
    let state: Vec<(Tensor, Tensor)> = model
        .params
        .params
        .iter()
        .map(|p| {
            Ok((
                Tensor::zeros(gpu, p.tensor.shape())?,
                Tensor::zeros(gpu, p.tensor.shape())?,
            ))
        })
        .collect::<Result<_>>()?;
    let hp = AdamW::default();
    let (mut fw, mut bw, mut op) = (Vec::new(), Vec::new(), Vec::new());
    let mut allocs = 0;
    let mut kernels = Vec::new();
    for step in 0..reps + 2 {
        if step == reps + 1 {
            gpu.profile_start(true)?;
        }
        let t0 = Instant::now();
        let mut tape = Tape::new();
        let vars = model.params.vars(&mut tape);
        let out = model.forward(&mut tape, &vars, &b)?;
        gpu.sync()?;
        let t1 = Instant::now();
        let mut grads = tape.backward(&out.loss)?;
        let grads = model.params.grads(&vars, &mut grads);
        gpu.sync()?;
        let t2 = Instant::now();
        let present: Vec<&Tensor> = grads.iter().flatten().collect();
        let clip = adamw::grad_norm(&present, 1.0)?;
        for ((p, g), (m, v)) in model.params.params.iter().zip(&grads).zip(&state) {
            if let Some(g) = g {
                adamw::adamw_step(
                    &p.tensor,
                    g,
                    m,
                    v,
                    step as u64 + 1,
                    &hp,
                    decays(&p.name),
                    Some(&clip),
                )?;
            }
        }
        drop(out);
        drop(vars);
        gpu.sync()?;
        let t3 = Instant::now();
        if step == reps + 1 {
            kernels = gpu.profile_stop()?;
            continue;
        }
        if step == 0 {
            allocs = gpu.pool_stats().allocations;
            continue; // warm-up: pipelines compile, the pool fills
        }
        fw.push((t1 - t0).as_secs_f64());
        bw.push((t2 - t1).as_secs_f64());
        op.push((t3 - t2).as_secs_f64());
    }
    let med = |mut v: Vec<f64>| {
        v.sort_by(|a, b| a.total_cmp(b));
        v[v.len() / 2]
    };
    let (f, bk, o) = (med(fw), med(bw), med(op));
    let stats = gpu.pool_stats();
    Ok(StepTimes {
        forward_ms: f * 1e3,
        backward_ms: bk * 1e3,
        optimizer_ms: o * 1e3,
        images_per_s: batch as f64 / (f + bk + o),
        peak_pool_mib: stats.peak_bytes as f64 / 1048576.0,
        allocations_after_first_step: stats.allocations - allocs,
        kernels,
    })
}

pub fn print_table(rows: &[Measure]) {
    println!(
        "{:<34} {:>22} {:>12} {:>14}",
        "kernel", "shape", "median ms", "rate"
    );
    for m in rows {
        println!(
            "{:<34} {:>22} {:>12.3} {:>8.2} {}",
            m.kernel, m.shape, m.median_ms, m.rate, m.unit
        );
    }
}

/// Per-kernel share of one profiled step, largest first.
pub fn print_kernel_times(k: &[KernelTime], timestamps: bool) {
    let total: f64 = k.iter().map(|t| t.seconds).sum();
    println!(
        "\nkernel time in one step ({}; total {:.1} ms)",
        if timestamps {
            "GPU timestamps"
        } else {
            "wall time per dispatch"
        },
        total * 1e3
    );
    let mut k = k.to_vec();
    k.sort_by(|a, b| b.seconds.total_cmp(&a.seconds));
    println!("{:<48} {:>6} {:>10} {:>7}", "kernel", "calls", "ms", "share");
    for t in &k {
        println!(
            "{:<48} {:>6} {:>10.2} {:>6.1}%",
            t.kernel,
            t.calls,
            t.seconds * 1e3,
            100.0 * t.seconds / total.max(1e-12)
        );
    }
}

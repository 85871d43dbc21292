//! Kernel benchmarks shared by `clip-wgpu bench` and `cargo bench`: each
//! case runs a kernel a few times and reports the median wall time around
//! submit + wait, with its arithmetic rate.

use crate::dist::World;
use crate::gpu::tune::time;
use crate::gpu::{Gpu, KernelTime};
use crate::model::clip::{Batch, ClipModel};
use crate::model::config::{ModelConfig, TextConfig};
use crate::model::params::decays;
use crate::model::weights::{HostTensor, Weights};
use crate::ops::activation::{self, Act};
use crate::ops::adamw::{self, AdamW};
use crate::ops::attention_fused::{self, Dims};
use crate::ops::convert::{self, Operand};
use crate::ops::matmul::{gemm_into, kernel_name, Gemm};
use crate::ops::softmax::{self, Mask};
use crate::ops::{attention, calibrate, elementwise, layernorm, loss};
use crate::precision::Precision;
use crate::tape::Tape;
use crate::tensor::Tensor;
use crate::train::accumulate::{group_grads, AccumulationLoss};
use anyhow::{ensure, Result};
use std::sync::Arc;
use std::time::Instant;

pub struct Measure {
    pub kernel: String,
    pub shape: String,
    pub median_ms: f64,
    /// GFLOP/s for compute-bound kernels, else GB/s of memory traffic.
    pub rate: f64,
    pub unit: &'static str,
    /// `rate` as a share of this adapter's calibrated peak (FMA or copy).
    pub peak_share: Option<f64>,
}

impl Measure {
    pub fn json(&self) -> String {
        serde_json::json!({
            "kernel": self.kernel,
            "shape": self.shape,
            "median_ms": self.median_ms,
            "rate": self.rate,
            "unit": self.unit,
            "peak_share": self.peak_share,
        })
        .to_string()
    }
}

/// Deterministic filler in [-1, 1).
fn filler(n: usize) -> Vec<f32> {
    (0..n)
        .map(|i| ((i * 7919 % 2003) as f32 / 1001.5) - 1.0)
        .collect()
}

/// This adapter's measured best: FMA throughput and copy bandwidth.
#[derive(Clone, Copy, Debug)]
pub struct Peak {
    pub gflops: f64,
    pub gbps: f64,
}

/// Run the calibration kernels (ops::calibrate) and keep the best of `reps`.
pub fn calibrate(gpu: &Arc<Gpu>, reps: usize) -> Result<(Peak, Vec<Measure>)> {
    let n = 1 << 16;
    let iters = 1024;
    let out = Tensor::zeros(gpu, &[4 * n])?;
    let mut flops = 0.0;
    let t = time(gpu, reps, || {
        flops = calibrate::fma_peak(&out, n, iters)?;
        Ok(())
    })?;
    let gflops = flops / t / 1e9;
    let len = 16 << 20; // 64 MiB each way
    let (src, dst) = (Tensor::zeros(gpu, &[len])?, Tensor::zeros(gpu, &[len])?);
    let mut bytes = 0.0;
    let tc = time(gpu, reps, || {
        bytes = calibrate::copy_peak(&dst, &src)?;
        Ok(())
    })?;
    let gbps = bytes / tc / 1e9;
    let rows = vec![
        Measure {
            kernel: "peak: fma (calibration)".into(),
            shape: format!("{n}x{iters}x8 vec4"),
            median_ms: t * 1e3,
            rate: gflops,
            unit: "GFLOP/s",
            peak_share: Some(1.0),
        },
        Measure {
            kernel: "peak: copy (calibration)".into(),
            shape: format!("{} MiB", (len * 4) >> 20),
            median_ms: tc * 1e3,
            rate: gbps,
            unit: "GB/s",
            peak_share: Some(1.0),
        },
    ];
    Ok((Peak { gflops, gbps }, rows))
}

/// `g` timed, its operands f32 or (`half`: format, and whether A is packed
/// too) packed as the half modes' steps pass them (B always: a weight or a
/// kept activation), with the forward's ROUND epilogue when both are.
pub fn matmul_case(
    gpu: &Arc<Gpu>,
    label: &str,
    g: Gemm,
    reps: usize,
    half: Option<(Precision, bool)>,
) -> Result<Measure> {
    let a_len = g.batch * g.m * g.k;
    let b_len = g.batch * g.k * g.n;
    let a = Tensor::from_slice(gpu, &filler(a_len), &[a_len])?;
    let b = Tensor::from_slice(gpu, &filler(b_len), &[b_len])?;
    let c = Tensor::empty(gpu, &[g.batch, g.m, g.n])?;
    let (ap, bp) = match half {
        Some((fmt, a16)) => (
            a16.then(|| convert::pack(&a, fmt)).transpose()?,
            Some(convert::pack(&b, fmt)?),
        ),
        None => (None, None),
    };
    let a_op = ap.as_ref().map_or(Operand::F32(&a), Operand::Half);
    let b_op = bp.as_ref().map_or(Operand::F32(&b), Operand::Half);
    let g = match half {
        Some((fmt, true)) => g.round(fmt),
        _ => g,
    };
    let t = time(gpu, reps, || gemm_into(&c, a_op, b_op, None, g))?;
    let variant = kernel_name(&g, a_op, b_op, &c)?;
    Ok(Measure {
        kernel: format!("matmul {label} ({variant})"),
        shape: format!(
            "{}x{}x{}x{}{}{}{}",
            g.batch,
            g.m,
            g.n,
            g.k,
            if g.ta { " ta" } else { "" },
            if g.tb { " tb" } else { "" },
            match half {
                Some((fmt, true)) => format!(" ab:{}", fmt.name()),
                Some((fmt, false)) => format!(" b:{}", fmt.name()),
                None => String::new(),
            }
        ),
        median_ms: t * 1e3,
        rate: g.flops() / t / 1e9,
        unit: "GFLOP/s",
        peak_share: None,
    })
}

/// The sizes of one tower's encoder layers in a training step.
struct Tower {
    name: &'static str,
    /// Tokens per example (text: 77, or the model's positions if fewer).
    tokens: usize,
    width: usize,
    mlp: usize,
    heads: usize,
    act: Act,
    causal: bool,
}

fn towers(config: &ModelConfig) -> Vec<Tower> {
    let v = &config.vision;
    let act = |s: &str| Act::from_hf(s).unwrap_or(Act::Gelu);
    let (t_heads, t_mlp, t_act) = match &config.text {
        TextConfig::Clip(c) => (
            c.num_attention_heads,
            c.intermediate_size,
            act(&c.hidden_act),
        ),
        TextConfig::Roberta(c) => (
            c.num_attention_heads,
            c.intermediate_size,
            act(&c.hidden_act),
        ),
    };
    vec![
        Tower {
            name: "vision",
            tokens: (v.image_size / v.patch_size).pow(2) + 1,
            width: v.hidden_size,
            mlp: v.intermediate_size,
            heads: v.num_attention_heads,
            act: act(&v.hidden_act),
            causal: false,
        },
        Tower {
            name: "text",
            tokens: config.text.max_positions().min(77),
            width: config.text.hidden_size(),
            mlp: t_mlp,
            heads: t_heads,
            act: t_act,
            causal: matches!(config.text, TextConfig::Clip(_)),
        },
    ]
}

/// The kernel table: calibration, the 1024^3 reference matmul in each
/// transpose mode, then every kernel at the shapes of `config`'s training
/// step at `batch` (each tower's linear layers forward and backward,
/// attention, row kernels, loss, AdamW on the largest parameter). In a half
/// `precision` the matmuls and fused attention read packed operands as the
/// step does.
pub fn kernel_table(
    gpu: &Arc<Gpu>,
    config: &ModelConfig,
    batch: usize,
    reps: usize,
    precision: Precision,
) -> Result<Vec<Measure>> {
    let (peak, mut out) = calibrate(gpu, reps)?;
    for (label, ta, tb) in [
        ("NN", false, false),
        ("NT", false, true),
        ("TN", true, false),
    ] {
        let g = Gemm::new(1, 1024, 1024, 1024).ta(ta).tb(tb);
        out.push(matmul_case(gpu, &format!("1024^3 {label}"), g, reps, None)?);
    }
    for t in towers(config) {
        let rows = batch * t.tokens;
        let (d, f) = (t.width, t.mlp);
        let n = t.name;
        // (label, matmul, A packed too in a half mode: the forward's).
        let cases = [
            ("qkv/out proj", Gemm::new(1, rows, d, d).tb(true), true),
            ("fc1", Gemm::new(1, rows, f, d).tb(true), true),
            ("fc2", Gemm::new(1, rows, d, f).tb(true), true),
            ("fc1 dX", Gemm::new(1, rows, d, f), false),
            ("fc1 dW", Gemm::new(1, f, d, rows).ta(true), false),
        ];
        for (label, g, a16) in cases {
            let half = precision.is_half().then_some((precision, a16));
            out.push(matmul_case(gpu, &format!("{n} {label}"), g, reps, half)?);
        }
        out.extend(attention_cases(gpu, &t, batch, reps, precision)?);
        out.extend(row_cases(gpu, &t, batch, reps)?);
        out.extend(convert_cases(gpu, &t, batch, reps)?);
    }
    out.extend(loss_and_optimizer_cases(gpu, config, batch, reps)?);
    for m in out.iter_mut() {
        if m.peak_share.is_none() {
            let p = if m.unit == "GFLOP/s" {
                peak.gflops
            } else {
                peak.gbps
            };
            m.peak_share = Some(m.rate / p);
        }
    }
    Ok(out)
}

/// The 16-bit conversions of `--fp16` / `--bf16` on the tower's MLP
/// activation [rows, mlp]: the forward's round-and-pack (what an op saves)
/// and the backward's unpack.
fn convert_cases(gpu: &Arc<Gpu>, t: &Tower, batch: usize, reps: usize) -> Result<Vec<Measure>> {
    let rows = batch * t.tokens;
    let x = tensor(gpu, &[rows, t.mlp])?;
    let n = x.numel() as f64;
    let shape = format!("{rows}x{}", t.mlp);
    let mut out = Vec::new();
    for fmt in [Precision::F16, Precision::Bf16] {
        let f = fmt.name();
        out.push(mem_case(
            gpu,
            &format!("{} {f} round+pack (fc1)", t.name),
            shape.clone(),
            n * 10.0,
            reps,
            || convert::round_pack(&x, fmt).map(drop),
        )?);
        let h = convert::pack(&x, fmt)?;
        out.push(mem_case(
            gpu,
            &format!("{} {f} unpack (fc1)", t.name),
            shape.clone(),
            n * 6.0,
            reps,
            || h.unpack().map(drop),
        )?);
    }
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
        peak_share: None,
    })
}

fn tensor(gpu: &Arc<Gpu>, shape: &[usize]) -> Result<Tensor> {
    let n = shape.iter().product();
    Tensor::from_slice(gpu, &filler(n), shape)
}

/// Attention of one tower as the step runs it: scores and P V matmuls at
/// the (padded) length the adapter uses, masked softmax forward/backward.
fn attention_cases(
    gpu: &Arc<Gpu>,
    t: &Tower,
    batch: usize,
    reps: usize,
    precision: Precision,
) -> Result<Vec<Measure>> {
    let (h, dh) = (t.heads, t.width / t.heads);
    let tp = attention::padded_len(gpu, batch * h, t.tokens, dh);
    let n = t.name;
    let mut out = vec![
        matmul_case(
            gpu,
            &format!("{n} attn scores"),
            Gemm::new(batch * h, tp, tp, dh).tb(true),
            reps,
            None,
        )?,
        matmul_case(
            gpu,
            &format!("{n} attn P V"),
            Gemm::new(batch * h, tp, dh, tp),
            reps,
            None,
        )?,
    ];
    // The whole attention forward + backward, both ways (the step uses
    // the faster, see ops::attention).
    let q = tensor(gpu, &[batch, t.tokens, t.width])?;
    let d = Dims {
        b: batch,
        t: t.tokens,
        h,
        dh,
        sg: gpu.subgroups_of_8(),
        tiled: None,
    };
    let plain = Mask {
        causal: t.causal,
        key_valid: None,
        keys: None,
    };
    let flops = 2.0 * (batch * h * t.tokens * t.tokens * dh) as f64 * 2.0 * 3.0;
    // Fused, tiled (the GPU kernels, at the largest workgroup the device
    // fits), unfused: (name, fused, dims).
    let mut ways = Vec::new();
    if attention_fused::supported(dh) {
        ways.push(("fused".to_string(), true, d));
    }
    if attention_fused::tiled_supported(dh) {
        if let Some(&r) = attention_fused::tiled_rows(gpu, dh).first() {
            let tiled = Dims {
                tiled: Some(r),
                ..d
            };
            ways.push((format!("tiled {r}"), true, tiled));
        }
    }
    ways.push(("unfused".to_string(), false, d));
    for (way, fused, d) in ways {
        let secs = time(gpu, reps, || match precision {
            // The fused kernels on packed q, k, v, as the half modes run.
            fmt if fused && fmt.is_half() => {
                let mut tape = Tape::new().with_precision(fmt);
                let x = tape.param(q.clone());
                let o =
                    attention_fused::attention_fused_half(&mut tape, [&x, &x, &x], d, &plain, fmt)?;
                let seed = o.tensor().clone();
                tape.backward_with(&o, seed).map(drop)
            }
            _ => attention::forward_backward(&q, &q, &q, d, &plain, fused),
        })?;
        let way = match precision {
            fmt if fused && fmt.is_half() => format!("{way}, {}", fmt.name()),
            _ => way,
        };
        out.push(Measure {
            kernel: format!("{n} attention fwd+bwd ({way})"),
            shape: format!("{batch}x{}x{h}x{dh}", t.tokens),
            median_ms: secs * 1e3,
            rate: flops / secs / 1e9,
            unit: "GFLOP/s",
            peak_share: None,
        });
    }
    let s = tensor(gpu, &[batch, h, tp, tp])?;
    let mask = Mask {
        causal: t.causal,
        key_valid: None,
        keys: (tp != t.tokens).then_some(t.tokens),
    };
    let sb = (s.numel() * 4) as f64;
    let shape = format!("{batch}x{h}x{tp}x{tp}");
    out.push(mem_case(
        gpu,
        &format!("{n} softmax fwd{}", if t.causal { " (causal)" } else { "" }),
        shape.clone(),
        2.0 * sb,
        reps,
        || softmax::forward(&s, &mask).map(drop),
    )?);
    let p = softmax::forward(&s, &mask)?;
    out.push(mem_case(
        gpu,
        &format!("{n} softmax bwd"),
        shape,
        3.0 * sb,
        reps,
        || softmax::backward(&p, &s).map(drop),
    )?);
    Ok(out)
}

/// Layer norm, activation and residual add of one tower.
fn row_cases(gpu: &Arc<Gpu>, t: &Tower, batch: usize, reps: usize) -> Result<Vec<Measure>> {
    let (rows, d, f) = (batch * t.tokens, t.width, t.mlp);
    let n = t.name;
    let x = tensor(gpu, &[rows, d])?;
    let g = tensor(gpu, &[d])?;
    let bta = tensor(gpu, &[d])?;
    let mut out = Vec::new();
    let b = (rows * d * 4) as f64;
    out.push(mem_case(
        gpu,
        &format!("{n} layernorm fwd"),
        format!("{rows}x{d}"),
        2.0 * b,
        reps,
        || layernorm::forward(&x, &g, &bta, 1e-5).map(drop),
    )?);
    let (_, mean, rstd) = layernorm::forward(&x, &g, &bta, 1e-5)?;
    out.push(mem_case(
        gpu,
        &format!("{n} layernorm bwd"),
        format!("{rows}x{d}"),
        4.0 * b,
        reps,
        || layernorm::backward(&x, &x, &g, &mean, &rstd).map(drop),
    )?);
    out.push(mem_case(
        gpu,
        &format!("{n} residual add"),
        format!("{rows}x{d}"),
        3.0 * b,
        reps,
        || elementwise::add(&x, &x).map(drop),
    )?);
    let hid = tensor(gpu, &[rows, f])?;
    let hb = (rows * f * 4) as f64;
    out.push(mem_case(
        gpu,
        &format!("{n} {:?} fwd", t.act),
        format!("{rows}x{f}"),
        2.0 * hb,
        reps,
        || activation::forward(&hid, t.act).map(drop),
    )?);
    out.push(mem_case(
        gpu,
        &format!("{n} {:?} bwd", t.act),
        format!("{rows}x{f}"),
        3.0 * hb,
        reps,
        || activation::backward(&hid, &hid, t.act).map(drop),
    )?);
    Ok(out)
}

fn loss_and_optimizer_cases(
    gpu: &Arc<Gpu>,
    config: &ModelConfig,
    batch: usize,
    reps: usize,
) -> Result<Vec<Measure>> {
    let e = config.projection_dim;
    let (ie, te) = (tensor(gpu, &[batch, e])?, tensor(gpu, &[batch, e])?);
    let scale = Tensor::scalar(gpu, 2.6592)?;
    let mut out = vec![mem_case(
        gpu,
        "contrastive loss fwd",
        format!("{batch}x{e}"),
        2.0 * (batch * e * 4) as f64,
        reps,
        || loss::clip_loss_forward(&ie, &te, &scale).map(drop),
    )?];
    // The largest parameter: the token embedding (or an MLP weight).
    let n = ClipModel::expected_tensors(config)?
        .iter()
        .map(|(_, s)| s.iter().product::<usize>())
        .max()
        .unwrap_or(1);
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
        "adamw (largest parameter)",
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

/// The contrastive loss alone over `n` pairs of `e`-dimensional
/// embeddings, forward and backward as full-batch accumulation runs it
/// (blocked above 1,024 pairs): (median ms, the most pooled
/// bytes in use at once, embeddings included; run it on a fresh `Gpu`).
pub fn contrastive_loss(gpu: &Arc<Gpu>, n: usize, e: usize, reps: usize) -> Result<(f64, u64)> {
    let (ie, te) = (tensor(gpu, &[n, e])?, tensor(gpu, &[n, e])?);
    let scale = Tensor::scalar(gpu, 2.6592)?;
    let ms = time(gpu, reps, || {
        let mut tape = Tape::new();
        let (iv, tv, sv) = (
            tape.param(ie.clone()),
            tape.param(te.clone()),
            tape.param(scale.clone()),
        );
        let l = loss::contrastive_loss(&mut tape, &iv, &tv, &sv)?;
        let g = tape.backward(&l)?;
        drop(g);
        Ok(())
    })? * 1e3;
    Ok((ms, gpu.pool_stats().live_peak_bytes))
}

/// `tiny`, `b32`, `clip-roberta`, or a model folder / config.json path.
pub fn bench_config(name: &str) -> Result<ModelConfig> {
    match name {
        "tiny" => Ok(tiny_config()),
        "b32" => Ok(b32_config()),
        "clip-roberta" => Ok(clip_roberta_config()),
        path => {
            let p = std::path::Path::new(path);
            let file = if p.is_dir() {
                p.join("config.json")
            } else {
                p.to_path_buf()
            };
            anyhow::ensure!(
                file.is_file(),
                "--config {path}: expected tiny, b32, clip-roberta, a model folder with config.json, or a \
                 config.json file"
            );
            ModelConfig::from_file(&file)
        }
    }
}

/// openai/clip-vit-base-patch32's architecture (ViT-B/32): vision 768 wide,
/// 12 layers, 12 heads, 224 px, patch 32; text 512 wide, 12 layers, 8 heads,
/// 77 tokens, vocab 49,408; projection 512; quick_gelu.
pub fn b32_config() -> ModelConfig {
    clip_arch(
        "b32 config",
        [768, 3072, 12, 12, 224, 32],
        [512, 2048, 12, 8],
        512,
    )
}

/// run_clip.py's model: VisionTextDualEncoderModel of openai/clip-vit-base-patch32's
/// vision tower (ViT-B/32) and roberta-base (768 wide, 12 layers, 12 heads,
/// MLP 3072, erf GELU, post-LN with eps 1e-5, vocab 50,265, 514 positions),
/// projection 512.
pub fn clip_roberta_config() -> ModelConfig {
    let cfg = serde_json::json!({
        "model_type": "vision-text-dual-encoder",
        "projection_dim": 512,
        "logit_scale_init_value": 2.6592,
        "vision_config": {"model_type": "clip_vision_model", "hidden_size": 768,
            "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
            "image_size": 224, "patch_size": 32, "hidden_act": "quick_gelu"},
        "text_config": {"model_type": "roberta", "hidden_size": 768, "intermediate_size": 3072,
            "num_hidden_layers": 12, "num_attention_heads": 12, "max_position_embeddings": 514,
            "vocab_size": 50265, "type_vocab_size": 1, "hidden_act": "gelu",
            "layer_norm_eps": 1e-5, "pad_token_id": 1}
    });
    ModelConfig::from_value(cfg, "clip-roberta config").expect("valid built-in config")
}

/// The demo model of `clip-wgpu train` (issue: vision 64 px, patch 8, width
/// 128, 4 layers, 4 heads, MLP 512; text the same with 77 positions and
/// CLIP's 49,408-token vocabulary; projection 128; quick_gelu).
pub fn tiny_config() -> ModelConfig {
    clip_arch(
        "tiny config",
        [128, 512, 4, 4, 64, 8],
        [128, 512, 4, 4],
        128,
    )
}

/// A CLIP config: vision [width, mlp, layers, heads, image, patch], text
/// [width, mlp, layers, heads] with 77 positions and CLIP's vocabulary.
fn clip_arch(name: &str, v: [usize; 6], t: [usize; 4], proj: usize) -> ModelConfig {
    let cfg = serde_json::json!({
        "model_type": "clip",
        "projection_dim": proj,
        "logit_scale_init_value": 2.6592,
        "vision_config": {"hidden_size": v[0], "intermediate_size": v[1], "num_hidden_layers": v[2],
            "num_attention_heads": v[3], "image_size": v[4], "patch_size": v[5], "hidden_act": "quick_gelu"},
        "text_config": {"hidden_size": t[0], "intermediate_size": t[1], "num_hidden_layers": t[2],
            "num_attention_heads": t[3], "max_position_embeddings": 77, "vocab_size": 49408,
            "hidden_act": "quick_gelu", "eos_token_id": 49407}
    });
    ModelConfig::from_value(cfg, name).expect("valid built-in config")
}

pub struct StepTimes {
    /// With accumulation (K > 1): 0, the gradients of both passes are in
    /// `backward_ms`.
    pub forward_ms: f64,
    pub backward_ms: f64,
    pub optimizer_ms: f64,
    pub images_per_s: f64,
    pub peak_pool_mib: f64,
    /// The most pooled bytes in use at once (what the step needed).
    pub live_peak_mib: f64,
    /// What the forward leaves in use for the backward (saved activations,
    /// outputs); 0 with accumulation.
    pub tape_mib: f64,
    pub allocations_after_first_step: u64,
    /// Command-buffer submits per step (the phases are waited for here, so
    /// at least 3).
    pub submits_per_step: f64,
    /// Median of whole steps recorded as one command buffer (no waits
    /// between the phases), and the submits each took.
    pub step_ms: f64,
    pub step_submits: f64,
    /// GPU time per kernel over one more (profiled) step.
    pub kernels: Vec<KernelTime>,
    /// Text positions in the batch (padded) and those the text tower runs.
    pub text_len: usize,
    pub text_run: usize,
}

/// How a benchmarked step makes its gradients.
#[derive(Clone, Copy, Debug)]
pub struct StepMode {
    /// Micro-batches per optimizer step (`--gradient_accumulation_steps`).
    pub accum: usize,
    pub loss: AccumulationLoss,
    pub gradient_checkpointing: bool,
    /// `--fp16` / `--bf16`: 16-bit activations (f32 master weights).
    pub precision: crate::precision::Precision,
}

impl Default for StepMode {
    fn default() -> Self {
        StepMode {
            accum: 1,
            loss: AccumulationLoss::Full,
            gradient_checkpointing: false,
            precision: crate::precision::Precision::F32,
        }
    }
}

/// One training step of a model on fixed inputs (deterministic filler
/// weights; text padded to 77): forward, backward, global-norm clipping and
/// AdamW, as the trainer runs them (pixels uploaded from the host each
/// step, as the trainer's loader hands them over).
pub struct StepBench {
    gpu: Arc<Gpu>,
    model: ClipModel,
    /// One host batch per micro-batch: pixels, ids, mask.
    micro: Vec<(Vec<f32>, Vec<u32>, Vec<f32>)>,
    batch: usize,
    mode: StepMode,
    state: Vec<(Tensor, Tensor)>,
    step: u64,
    /// Bytes the last single-batch forward left in use for its backward
    /// (the tape's saved activations and the outputs).
    tape_bytes: u64,
}

impl StepBench {
    pub fn new(gpu: &Arc<Gpu>, config: ModelConfig, batch: usize) -> Result<StepBench> {
        Self::with_mode(gpu, config, batch, StepMode::default())
    }

    pub fn with_mode(
        gpu: &Arc<Gpu>,
        config: ModelConfig,
        batch: usize,
        mode: StepMode,
    ) -> Result<StepBench> {
        ensure!(mode.accum > 0, "accumulation steps must be at least 1");
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
        let mut model = ClipModel::from_weights(gpu, config, &w, "benchmark weights")?;
        model.set_gradient_checkpointing(mode.gradient_checkpointing);
        model.precision = mode.precision;
        let s = model.config.vision.image_size;
        let len = model.config.text.max_positions().min(77);
        // Micro-batch k: other pixels and tokens (k = 0 is the plain
        // step's batch), the same text lengths.
        let micro = (0..mode.accum)
            .map(|k| {
                let px = filler(batch * 3 * s * s + k)[k..].to_vec();
                let ids: Vec<u32> = (0..batch * len)
                    .map(|i| {
                        if i % len == len / 2 {
                            49407
                        } else {
                            ((i + k * 7919) * 37 % 40000) as u32
                        }
                    })
                    .collect();
                let mask: Vec<f32> = (0..batch * len)
                    .map(|i| (i % len <= len / 2) as u8 as f32)
                    .collect();
                (px, ids, mask)
            })
            .collect();
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
        Ok(StepBench {
            gpu: gpu.clone(),
            model,
            micro,
            batch,
            mode,
            state,
            step: 0,
            tape_bytes: 0,
        })
    }

    /// Micro-batch `k` uploaded.
    fn upload(&self, k: usize) -> Result<Batch> {
        let s = self.model.config.vision.image_size;
        let (px, ids, mask) = &self.micro[k];
        Ok(Batch {
            pixels: Tensor::from_slice(&self.gpu, px, &[self.batch, 3, s, s])?,
            ids: ids.clone(),
            mask: mask.clone(),
            batch: self.batch,
        })
    }

    /// Run one step; seconds spent in forward, backward and the optimizer
    /// (each phase waited for; with accumulation the forward is 0 and the
    /// backward holds both passes).
    pub fn run(&mut self) -> Result<[f64; 3]> {
        self.run_with(true)
    }

    /// One step recorded into one command buffer and submitted once
    /// (no waits between the phases); its wall time.
    pub fn run_whole(&mut self) -> Result<f64> {
        let t = self.run_with(false)?;
        Ok(t.iter().sum())
    }

    fn run_with(&mut self, phases: bool) -> Result<[f64; 3]> {
        let wait = |gpu: &Gpu| if phases { gpu.sync() } else { Ok(()) };
        self.step += 1;
        let t0 = Instant::now();
        let (t1, grads) = if self.mode.accum > 1 {
            let g = group_grads(
                &self.model,
                self.mode.loss,
                self.mode.accum,
                |k| self.upload(k),
                &World::single(),
            )?;
            (t0, g.grads)
        } else {
            let b = self.upload(0)?;
            let live = self.gpu.pool_stats().live_bytes();
            let mut tape = self.model.tape();
            let vars = self.model.params.vars(&mut tape);
            let out = self.model.forward(&mut tape, &vars, &b)?;
            self.tape_bytes = self.gpu.pool_stats().live_bytes().saturating_sub(live);
            wait(&self.gpu)?;
            let t1 = Instant::now();
            let mut grads = tape.backward(&out.loss)?;
            (t1, self.model.params.grads(&vars, &mut grads))
        };
        wait(&self.gpu)?;
        let t2 = Instant::now();
        let present: Vec<&Tensor> = grads.iter().flatten().collect();
        let clip = adamw::grad_norm(&present, 1.0)?;
        let hp = AdamW::default();
        for ((p, g), (m, v)) in self.model.params.params.iter().zip(&grads).zip(&self.state) {
            if let Some(g) = g {
                adamw::adamw_step(
                    &p.tensor,
                    g,
                    m,
                    v,
                    self.step,
                    &hp,
                    decays(&p.name),
                    Some(&clip),
                )?;
            }
        }
        drop(grads);
        self.gpu.sync()?;
        let t3 = Instant::now();
        Ok([
            (t1 - t0).as_secs_f64(),
            (t2 - t1).as_secs_f64(),
            (t3 - t2).as_secs_f64(),
        ])
    }
}

/// Median forward / backward / AdamW times of one training step of `config`
/// at `batch` (x `mode.accum` micro-batches) over `reps` steps after a
/// warm-up step, then one more step profiled per kernel.
pub fn training_step(
    gpu: &Arc<Gpu>,
    config: ModelConfig,
    batch: usize,
    reps: usize,
    mode: StepMode,
) -> Result<StepTimes> {
    let med = |mut v: Vec<f64>| {
        v.sort_by(|a, b| a.total_cmp(b));
        v[v.len() / 2]
    };
    let mut sb = StepBench::with_mode(gpu, config, batch, mode)?;
    sb.run()?; // warm-up: pipelines compile, matmuls tune, the pool fills
    let allocs = gpu.pool_stats().allocations;
    let submits = gpu.submit_count();
    let (mut fw, mut bw, mut op) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..reps {
        let [f, b, o] = sb.run()?;
        fw.push(f);
        bw.push(b);
        op.push(o);
    }
    let submits_per_step = (gpu.submit_count() - submits) as f64 / reps as f64;
    let mut whole = Vec::new();
    let submits = gpu.submit_count();
    for _ in 0..reps {
        whole.push(sb.run_whole()?);
    }
    let whole_submits = (gpu.submit_count() - submits) as f64 / reps as f64;
    let allocations_after_first_step = gpu.pool_stats().allocations - allocs;
    gpu.profile_start(true)?;
    sb.run()?;
    let kernels = gpu.profile_stop()?;
    let (f, bk, o) = (med(fw), med(bw), med(op));
    let stats = gpu.pool_stats();
    let b0 = sb.upload(0)?;
    Ok(StepTimes {
        forward_ms: f * 1e3,
        backward_ms: bk * 1e3,
        optimizer_ms: o * 1e3,
        images_per_s: (batch * mode.accum) as f64 / (f + bk + o),
        peak_pool_mib: stats.peak_bytes as f64 / 1048576.0,
        live_peak_mib: stats.live_peak_bytes as f64 / 1048576.0,
        tape_mib: sb.tape_bytes as f64 / 1048576.0,
        allocations_after_first_step,
        submits_per_step,
        step_ms: med(whole) * 1e3,
        step_submits: whole_submits,
        kernels,
        text_len: b0.ids.len() / batch,
        text_run: sb.model.text_run_len(&b0),
    })
}

/// The process's peak resident memory (VmHWM) in MiB, where the system
/// reports it (Linux); on lavapipe GPU buffers are host memory and count.
pub fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

pub fn print_table(rows: &[Measure]) {
    println!(
        "{:<40} {:>22} {:>11} {:>18} {:>6}",
        "kernel", "shape", "median ms", "rate", "peak"
    );
    for m in rows {
        let share = m
            .peak_share
            .map_or(String::new(), |s| format!("{:.0}%", 100.0 * s));
        println!(
            "{:<40} {:>22} {:>11.3} {:>10.2} {:<7} {:>6}",
            m.kernel, m.shape, m.median_ms, m.rate, m.unit, share
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
    println!(
        "{:<48} {:>6} {:>10} {:>7}",
        "kernel", "calls", "ms", "share"
    );
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

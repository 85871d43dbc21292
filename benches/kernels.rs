//! `cargo bench --bench kernels [FILTER]`: criterion benchmarks of the main
//! kernels at the demo (`tiny`) model's training-step shapes, and of a whole
//! tiny training step, on the default adapter. Each iteration waits for the
//! GPU, so the times are submit-to-finish. `clip-wgpu bench` gives the full
//! table with GPU timestamps and shares of the adapter's peak.

use clip_wgpu::bench::{tiny_config, StepBench, StepMode};
use clip_wgpu::gpu::AdapterRequest;
use clip_wgpu::ops::activation::{self, Act};
use clip_wgpu::ops::adamw::{self, AdamW};
use clip_wgpu::ops::matmul::{gemm_into, Gemm};
use clip_wgpu::ops::softmax::{self, Mask};
use clip_wgpu::ops::{layernorm, loss, loss_blocked, loss_local};
use clip_wgpu::{Gpu, Tensor};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn gpu() -> Arc<Gpu> {
    Gpu::new(&AdapterRequest::default().with_env().unwrap()).expect("a wgpu adapter")
}

fn filled(gpu: &Arc<Gpu>, shape: &[usize]) -> Tensor {
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n)
        .map(|i| ((i * 7919 % 2003) as f32 / 1001.5) - 1.0)
        .collect();
    Tensor::from_slice(gpu, &v, shape).unwrap()
}

/// Time `iters` runs of `f` and one wait for the GPU at the end.
fn gpu_iters(gpu: &Gpu, iters: u64, mut f: impl FnMut()) -> Duration {
    gpu.sync().unwrap();
    let t = Instant::now();
    for _ in 0..iters {
        f();
    }
    gpu.sync().unwrap();
    t.elapsed()
}

fn matmuls(c: &mut Criterion) {
    let gpu = gpu();
    let mut g = c.benchmark_group("matmul");
    g.sample_size(10);
    let rows = 32 * 77;
    for (name, gm) in [
        ("1024^3 NN", Gemm::new(1, 1024, 1024, 1024)),
        (
            "text fc1 (2464x512x128 NT)",
            Gemm::new(1, rows, 512, 128).tb(true),
        ),
        (
            "text fc1 dW (512x128x2464 TN)",
            Gemm::new(1, 512, 128, rows).ta(true),
        ),
        (
            "attn scores (128x80x80x32 NT)",
            Gemm::new(128, 80, 80, 32).tb(true),
        ),
    ] {
        let a = filled(&gpu, &[gm.batch * gm.m * gm.k]);
        let b = filled(&gpu, &[gm.batch * gm.k * gm.n]);
        let out = Tensor::empty(&gpu, &[gm.batch, gm.m, gm.n]).unwrap();
        gemm_into(&out, &a, &b, None, gm).unwrap(); // tunes on first use
        g.throughput(Throughput::Elements(gm.flops() as u64));
        g.bench_function(name, |bch| {
            bch.iter_custom(|n| gpu_iters(&gpu, n, || gemm_into(&out, &a, &b, None, gm).unwrap()))
        });
    }
    g.finish();
}

fn row_kernels(c: &mut Criterion) {
    let gpu = gpu();
    let mut g = c.benchmark_group("rows");
    g.sample_size(10);
    let (rows, d, f) = (32 * 77, 128, 512);
    let x = filled(&gpu, &[rows, d]);
    let (gam, bet) = (filled(&gpu, &[d]), filled(&gpu, &[d]));
    g.bench_function("layernorm fwd 2464x128", |b| {
        b.iter_custom(|n| {
            gpu_iters(&gpu, n, || {
                layernorm::forward(&x, &gam, &bet, 1e-5).unwrap();
            })
        })
    });
    let (_, mean, rstd) = layernorm::forward(&x, &gam, &bet, 1e-5).unwrap();
    g.bench_function("layernorm bwd 2464x128", |b| {
        b.iter_custom(|n| {
            gpu_iters(&gpu, n, || {
                layernorm::backward(&x, &x, &gam, &mean, &rstd).unwrap();
            })
        })
    });
    let h = filled(&gpu, &[rows, f]);
    g.bench_function("quick_gelu fwd 2464x512", |b| {
        b.iter_custom(|n| {
            gpu_iters(&gpu, n, || {
                activation::forward(&h, Act::QuickGelu).unwrap();
            })
        })
    });
    let s = filled(&gpu, &[32, 4, 80, 80]);
    let mask = Mask {
        causal: true,
        key_valid: None,
        keys: Some(77),
    };
    g.bench_function("softmax fwd causal 32x4x80x80", |b| {
        b.iter_custom(|n| {
            gpu_iters(&gpu, n, || {
                softmax::forward(&s, &mask).unwrap();
            })
        })
    });
    let (ie, te) = (filled(&gpu, &[32, 128]), filled(&gpu, &[32, 128]));
    let scale = Tensor::scalar(&gpu, 2.6592).unwrap();
    g.bench_function("contrastive loss fwd 32x128", |b| {
        b.iter_custom(|n| {
            gpu_iters(&gpu, n, || {
                loss::clip_loss_forward(&ie, &te, &scale).unwrap();
            })
        })
    });
    // The full-batch loss of accumulation: 2,048 pairs in blocks of 1,024
    // text rows, forward and backward.
    let (ib, tb) = (filled(&gpu, &[2048, 128]), filled(&gpu, &[2048, 128]));
    g.bench_function("blocked contrastive loss fwd+bwd 2048x128", |b| {
        b.iter_custom(|n| {
            gpu_iters(&gpu, n, || {
                let (l, stats) = loss_blocked::forward(&ib, &tb, &scale, 1024).unwrap();
                loss_blocked::backward(&l, &ib, &tb, &scale, &stats, 1024, [true; 3]).unwrap();
            })
        })
    });
    // The local loss of one of 8 ranks at that global batch: its 256 rows
    // against all 2,048 columns, both halves (an eighth of the above).
    let (il, tl) = (filled(&gpu, &[256, 128]), filled(&gpu, &[256, 128]));
    g.bench_function("local contrastive loss fwd+bwd 256 of 2048x128", |b| {
        b.iter_custom(|n| {
            gpu_iters(&gpu, n, || {
                for (rows, cols) in [(&il, &tb), (&tl, &ib)] {
                    let (l, stats) = loss_local::forward(rows, cols, &scale, 768, 4096.0).unwrap();
                    loss_local::backward(&l, rows, cols, &scale, &stats, 768, 4096.0, [true; 3])
                        .unwrap();
                }
            })
        })
    });
    let len = 49408 * 128;
    let (p, gr, m, v) = (
        filled(&gpu, &[len]),
        filled(&gpu, &[len]),
        filled(&gpu, &[len]),
        filled(&gpu, &[len]),
    );
    let hp = AdamW::default();
    let mut step = 0;
    g.bench_function("adamw token embedding 49408x128", |b| {
        b.iter_custom(|n| {
            gpu_iters(&gpu, n, || {
                step += 1;
                adamw::adamw_step(&p, &gr, &m, &v, step, &hp, true, None).unwrap();
            })
        })
    });
    g.finish();
}

fn training_step(c: &mut Criterion) {
    let gpu = gpu();
    let mut g = c.benchmark_group("step");
    g.sample_size(10);
    g.measurement_time(Duration::from_secs(20));
    let batch = 32;
    let modes = [
        ("tiny training step, batch 32", StepMode::default()),
        (
            "tiny training step, 4 x 32 accumulated, checkpointing",
            StepMode {
                accum: 4,
                gradient_checkpointing: true,
                ..StepMode::default()
            },
        ),
    ];
    for (name, mode) in modes {
        let mut sb = StepBench::with_mode(&gpu, tiny_config(), batch, mode).unwrap();
        sb.run().unwrap(); // warm-up
        g.throughput(Throughput::Elements((batch * mode.accum) as u64));
        g.bench_function(name, |b| {
            b.iter_custom(|n| {
                let t = Instant::now();
                for _ in 0..n {
                    sb.run().unwrap();
                }
                t.elapsed()
            })
        });
    }
    g.finish();
}

criterion_group!(benches, matmuls, row_kernels, training_step);
criterion_main!(benches);

//! Kernel benchmarks on the default adapter: `cargo bench --bench kernels`.
//! Prints the median of several timed runs (wall time around submit + wait).

use clip_wgpu::gpu::AdapterRequest;
use clip_wgpu::ops::matmul::{gemm_into, Gemm, Variant};
use clip_wgpu::{Gpu, Tensor};
use std::time::Instant;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn time(gpu: &Gpu, reps: usize, mut f: impl FnMut()) -> f64 {
    f();
    gpu.sync().unwrap();
    let mut ts = Vec::new();
    for _ in 0..reps {
        let t = Instant::now();
        f();
        gpu.sync().unwrap();
        ts.push(t.elapsed().as_secs_f64());
    }
    median(ts)
}

fn main() {
    let filter = std::env::args().skip(1).find(|a| !a.starts_with('-'));
    let gpu = Gpu::new(&AdapterRequest::default().with_env().unwrap()).expect("adapter");
    println!("adapter: {} ({:?}, {:?})", gpu.info.name, gpu.info.backend, gpu.info.device_type);
    let shapes: &[(&str, usize, usize, usize, bool, bool)] = &[
        ("matmul 1024^3 NN", 1024, 1024, 1024, false, false),
        ("matmul 1024^3 NT", 1024, 1024, 1024, false, true),
        ("matmul 1024^3 TN", 1024, 1024, 1024, true, false),
    ];
    for &(name, m, n, k, ta, tb) in shapes {
        if filter.as_deref().is_some_and(|f| !name.contains(f)) {
            continue;
        }
        for v in [Variant::Vec4] {
            let a = Tensor::from_slice(&gpu, &vec![0.5; m * k], &[m, k]).unwrap();
            let b = Tensor::from_slice(&gpu, &vec![0.25; k * n], &[k, n]).unwrap();
            let c = Tensor::empty(&gpu, &[m, n]).unwrap();
            let g = Gemm::new(1, m, n, k).ta(ta).tb(tb).variant(v);
            let t = time(&gpu, 5, || gemm_into(&c, &a, &b, None, g).unwrap());
            println!("{name:<24} {v:<6?} median {:>8.2} ms  {:>7.2} GFLOP/s", t * 1e3, g.flops() / t / 1e9);
        }
    }
}

//! The autotuner verifies each matmul candidate against the reference
//! kernel the first time it times it on an adapter: a candidate made to
//! compute wrong results (test hook `Settings::broken_kernel`) is rejected,
//! recorded in the tuning cache with the reason, and never used; results
//! stay right.
mod common;
use clip_wgpu::gpu::{AdapterRequest, Settings};
use clip_wgpu::ops::matmul::{gemm, kernel_name, Gemm, Tile, Variant};
use clip_wgpu::{Gpu, Tensor};
use common::*;

fn matmul_ref(a: &[f64], b: &[f64], m: usize, n: usize, k: usize) -> Vec<f64> {
    let mut c = vec![0.0; m * n];
    for i in 0..m {
        for j in 0..n {
            c[i * n + j] = (0..k).map(|p| a[i * k + p] * b[p * n + j]).sum();
        }
    }
    c
}

#[test]
fn a_broken_candidate_is_rejected_and_never_used() {
    if gpu().is_none() {
        return;
    }
    let broken = "vec4 16x2";
    let settings = Settings {
        broken_kernel: Some(broken.into()),
        ..Settings::default()
    };
    let gpu = Gpu::with_settings(&AdapterRequest::default().with_env().unwrap(), settings).unwrap();
    let (m, n, k) = (64, 64, 64);
    let mut rng = Rng::new(3);
    let (ah, bh) = (rng.vec(m * k, 1.0), rng.vec(k * n, 1.0));
    let (a, b) = (upload(&gpu, &ah, &[m, k]), upload(&gpu, &bh, &[k, n]));
    let want = matmul_ref(&ah, &bh, m, n, k);

    // Control: forced, the hooked kernel really is wrong.
    let forced = Gemm::new(1, m, n, k).variant(Variant::Vec4).tile(Tile {
        rm: 16,
        rv: 2,
        sg: false,
    });
    let bad = download(&gemm(&a, &b, None, forced).unwrap());
    assert!(
        max_err(&bad, &want) > 0.1,
        "the hook did not break {broken}"
    );

    // Tuned: the broken candidate is rejected, the result is right.
    let g = Gemm::new(1, m, n, k);
    let c = download(&gemm(&a, &b, None, g).unwrap());
    assert_close("tuned matmul", &c, &want, 1e-5);
    let c_t = Tensor::empty(&gpu, &[m, n]).unwrap();
    let chosen = kernel_name(&g, &a, &b, &c_t).unwrap();
    assert_ne!(chosen, broken, "the broken kernel was chosen");
    let choices = gpu.kernel_choices();
    let why = choices
        .get(&format!("matmul 1x{m}x{n}x{k} rejected {broken}"))
        .unwrap_or_else(|| panic!("no rejection recorded: {choices:?}"));
    assert!(why.contains("max |difference|"), "reason: {why}");
    // Only the broken one: the others agree with the reference.
    let rejected: Vec<&String> = choices
        .keys()
        .filter(|k| k.contains(" rejected "))
        .collect();
    assert_eq!(rejected.len(), 1, "rejected: {rejected:?}");
}

#[test]
fn broken_fused_attention_is_rejected_for_the_unfused_kernels() {
    use clip_wgpu::gpu::settings::Attention;
    use clip_wgpu::ops::attention::attention;
    use clip_wgpu::ops::softmax::Mask;
    use clip_wgpu::Tape;
    if gpu().is_none() {
        return;
    }
    let req = AdapterRequest::default().with_env().unwrap();
    let (b, t, heads, dh) = (2, 17, 2, 32);
    let mut rng = Rng::new(5);
    let host: Vec<Vec<f64>> = (0..3).map(|_| rng.vec(b * t * heads * dh, 1.0)).collect();
    let run = |settings: Settings| {
        let gpu = Gpu::with_settings(&req, settings).unwrap();
        let mut tape = Tape::new();
        let [q, k, v] = [0, 1, 2].map(|i| tape.param(upload(&gpu, &host[i], &[b, t, heads * dh])));
        let mask = Mask {
            causal: false,
            key_valid: None,
            keys: None,
        };
        let o = download(
            attention(&mut tape, &q, &k, &v, heads, &mask)
                .unwrap()
                .tensor(),
        );
        (o, gpu.kernel_choices())
    };
    let broken = || Settings {
        broken_kernel: Some("fused attention".into()),
        ..Settings::default()
    };
    let (want, _) = run(Settings {
        attention: Some(Attention::Unfused),
        ..Settings::default()
    });
    // Control: forced, the hooked fused kernels really are wrong.
    let (bad, _) = run(Settings {
        attention: Some(Attention::Fused),
        ..broken()
    });
    assert!(
        max_err(&bad, &want) > 1e-2,
        "the hook did not break fused attention"
    );
    // Tuned: rejected, recorded, and the output is the unfused one's.
    let (got, choices) = run(broken());
    assert_close("tuned attention", &got, &want, 1e-6);
    let key = format!("attention {b}x{t}x{heads}x{dh}");
    assert_eq!(
        choices.get(&key).map(String::as_str),
        Some("unfused"),
        "{choices:?}"
    );
    let why = choices
        .get(&format!("{key} rejected fused"))
        .unwrap_or_else(|| panic!("no rejection recorded: {choices:?}"));
    assert!(why.contains("max |difference|"), "reason: {why}");
}

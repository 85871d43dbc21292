mod common;
use clip_wgpu::ops::adamw::{adamw_ref, adamw_step, grad_norm, grad_norm_ref, AdamW};
use clip_wgpu::Tensor;
use common::*;

/// `steps` AdamW steps on the GPU and in f64 from the same start, fresh
/// random gradients each step; returns (gpu p, m, v) and (ref p, m, v).
#[allow(clippy::type_complexity)]
fn run(
    n: usize,
    steps: u64,
    hp: &AdamW,
    decay: bool,
    max_norm: Option<f64>,
    seed: u64,
) -> ([Vec<f32>; 3], [Vec<f64>; 3], Vec<f64>) {
    let gpu = gpu().unwrap();
    let mut r = Rng::new(seed);
    let mut p = r.vec(n, 1.0);
    let (mut m, mut v) = (vec![0.0; n], vec![0.0; n]);
    let (pt, mt, vt) = (
        upload(&gpu, &p, &[n]),
        Tensor::zeros(&gpu, &[n]).unwrap(),
        Tensor::zeros(&gpu, &[n]).unwrap(),
    );
    let mut coefs = Vec::new();
    for step in 1..=steps {
        let g = r.vec(n, 0.5);
        let gt = upload(&gpu, &g, &[n]);
        let (clip, coef) = match max_norm {
            Some(mx) => {
                let c = grad_norm(&[&gt], mx as f32).unwrap();
                let (_, coef) = grad_norm_ref(&[&g], mx);
                // The GPU's coefficient (f32) drives both sides.
                let gc = c.to_vec().unwrap()[1] as f64;
                assert!((gc - coef).abs() < 1e-6, "coef {gc} vs {coef}");
                (Some(c), gc)
            }
            None => (None, 1.0),
        };
        coefs.push(coef);
        adamw_step(&pt, &gt, &mt, &vt, step, hp, decay, clip.as_ref()).unwrap();
        adamw_ref(&mut p, &g, &mut m, &mut v, step, hp, decay, coef);
    }
    let got = [
        pt.to_vec().unwrap(),
        mt.to_vec().unwrap(),
        vt.to_vec().unwrap(),
    ];
    (got, [p, m, v], coefs)
}

fn abs_err(a: &[f32], b: &[f64]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(&x, y)| (x as f64 - y).abs())
        .fold(0.0, f64::max)
}

fn check(
    name: &str,
    n: usize,
    steps: u64,
    hp: &AdamW,
    decay: bool,
    max_norm: Option<f64>,
) -> Vec<f64> {
    let (got, want, coefs) = run(n, steps, hp, decay, max_norm, 11);
    for (what, k) in [("p", 0), ("exp_avg", 1), ("exp_avg_sq", 2)] {
        let e = abs_err(&got[k], &want[k]);
        eprintln!("adamw {name} {what}: max abs error {e:.3e}");
        assert!(
            e <= 1e-6,
            "adamw {name} {what}: max abs error {e:.3e} > 1e-6"
        );
    }
    // Determinism: the same steps again give the same bits.
    let (again, _, _) = run(n, steps, hp, decay, max_norm, 11);
    assert!(got == again, "adamw {name}: runs differ");
    coefs
}

#[test]
fn adamw_matches_reference_over_several_steps() {
    if gpu().is_none() {
        return;
    }
    let hp = AdamW {
        lr: 1e-3,
        weight_decay: 0.1,
        ..AdamW::default()
    };
    check("lr1e-3 wd0.1 n257", 257, 10, &hp, true, None);
    // A multiple of 4: the vec4 kernel.
    check("lr1e-3 wd0.1 n256 (vec4)", 256, 10, &hp, true, None);
    check("lr1e-3 no decay n7", 7, 10, &hp, false, None);
    check("defaults n1", 1, 5, &AdamW::default(), true, None);
    let big = AdamW {
        lr: 1e-2,
        beta1: 0.8,
        beta2: 0.95,
        eps: 1e-6,
        weight_decay: 0.2,
    };
    check("lr1e-2 b(0.8,0.95) n70001", 70001, 8, &big, true, None);
}

#[test]
fn adamw_with_active_clipping() {
    if gpu().is_none() {
        return;
    }
    let hp = AdamW {
        lr: 1e-3,
        weight_decay: 0.01,
        ..AdamW::default()
    };
    // Norms of 50 values in [-0.5, 0.5) are ~2: max_norm 0.5 clips every step.
    check("clip 0.5 n52 (vec4)", 52, 6, &hp, true, Some(0.5));
    let coefs = check("clip 0.5 n50", 50, 6, &hp, true, Some(0.5));
    assert!(
        coefs.iter().all(|&c| c < 0.5),
        "clipping inactive: {coefs:?}"
    );
    let coefs = check("clip 100 n50", 50, 3, &hp, true, Some(100.0));
    assert!(
        coefs.iter().all(|&c| c == 1.0),
        "coef must clamp to 1: {coefs:?}"
    );
}

#[test]
fn grad_norm_matches_reference() {
    let Some(gpu) = gpu() else { return };
    let mut r = Rng::new(3);
    // Sizes around the sumsq chunking, one large enough for its two passes.
    let sizes = [1usize, 7, 50 * 77, 257 * 3, 256, 70001];
    let gs: Vec<Vec<f64>> = sizes.iter().map(|&n| r.vec(n, 1.0)).collect();
    let ts: Vec<Tensor> = gs.iter().map(|g| upload(&gpu, g, &[g.len()])).collect();
    let refs: Vec<&Tensor> = ts.iter().collect();
    let slices: Vec<&[f64]> = gs.iter().map(|g| &g[..]).collect();
    for max_norm in [1.0, 1e6] {
        let out = grad_norm(&refs, max_norm as f32).unwrap();
        assert_eq!(out.shape(), &[2]);
        let (total, coef) = grad_norm_ref(&slices, max_norm);
        let got = download(&out);
        assert_close(
            &format!("grad_norm max_norm {max_norm} [total, coef]"),
            &got,
            &[total, coef],
            1e-6,
        );
        let again = out.to_vec().unwrap();
        let second = grad_norm(&refs, max_norm as f32).unwrap().to_vec().unwrap();
        assert!(again == second, "grad_norm: runs differ");
    }
    let one = grad_norm(&refs[..1], 1.0).unwrap();
    assert_close(
        "grad_norm single",
        &download(&one),
        &[gs[0][0].abs(), (1.0 / (gs[0][0].abs() + 1e-6)).min(1.0)],
        1e-6,
    );
}

#[test]
fn adamw_rejects_mismatched_tensors() {
    let Some(gpu) = gpu() else { return };
    let hp = AdamW::default();
    let a = Tensor::zeros(&gpu, &[4]).unwrap();
    let b = Tensor::zeros(&gpu, &[4]).unwrap();
    let c = Tensor::zeros(&gpu, &[4]).unwrap();
    let g = Tensor::zeros(&gpu, &[4]).unwrap();
    let short = Tensor::zeros(&gpu, &[3]).unwrap();
    assert!(adamw_step(&a, &short, &b, &c, 1, &hp, true, None).is_err());
    assert!(adamw_step(&a, &g, &b, &c, 0, &hp, true, None).is_err());
    assert!(adamw_step(&a, &g, &b, &b, 1, &hp, true, None).is_err());
    assert!(adamw_step(&a, &g, &b, &c, 1, &hp, true, Some(&short)).is_err());
    assert!(grad_norm(&[], 1.0).is_err());
    assert!(adamw_step(&a, &g, &b, &c, 1, &hp, true, None).is_ok());
}

#[test]
fn adamw_reference_first_step_is_sign_descent() {
    // With m = v = 0, step 1 moves each weight by lr * g / (|g| + eps')
    // after decay: a closed form that pins the bias corrections.
    let hp = AdamW {
        lr: 0.01,
        weight_decay: 0.5,
        eps: 0.0,
        ..AdamW::default()
    };
    let (mut p, g) = (vec![1.0, -2.0, 0.5], vec![0.3, -0.2, 4.0]);
    let (mut m, mut v) = (vec![0.0; 3], vec![0.0; 3]);
    adamw_ref(&mut p, &g, &mut m, &mut v, 1, &hp, true, 1.0);
    let lr = hp.lr as f64;
    let decay = 1.0 - lr * hp.weight_decay as f64;
    let want = [1.0 * decay - lr, -2.0 * decay + lr, 0.5 * decay - lr];
    assert!(max_err(&p, &want) < 1e-9, "{p:?} vs {want:?}");
}

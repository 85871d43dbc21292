mod common;
use clip_wgpu::ops::activation::{
    act, act_backward_ref, act_ref, backward, erf, erfc, forward, Act,
};
use clip_wgpu::Tape;
use common::*;

const ALL: [Act; 4] = [Act::Gelu, Act::QuickGelu, Act::Tanh, Act::GeluTanh];

/// Random values plus the awkward ones: zero, tiny, the erf/tanh branch
/// points, and magnitudes where a naive exp overflows.
fn inputs(r: &mut Rng, n: usize) -> Vec<f64> {
    let mut x = r.vec(n, 5.0);
    let special = [
        0.0,
        1e-30,
        -1e-8,
        0.25,
        -0.25,
        0.8 * std::f64::consts::SQRT_2,
        -1.13,
        6.0,
        -6.0,
        10.0,
        -10.0,
        44.0,
        -45.0,
        89.0,
        -89.0,
        100.0,
        -100.0,
        1e4,
        -1e4,
        1e30,
        -1e30,
    ];
    for (i, s) in special.iter().enumerate() {
        if i < n {
            x[i] = *s as f32 as f64;
        }
    }
    x
}

#[test]
fn erf_reference_matches_known_values() {
    // Values of Python's math.erf / math.erfc (libm).
    for (x, e, ec) in [
        (0.1, 0.1124629160182849, 0.8875370839817152),
        (0.5, 0.5204998778130465, 0.4795001221869535),
        (1.0, 0.8427007929497149, 0.15729920705028513),
        (2.0, 0.9953222650189527, 0.004677734981047265),
        (2.4, 0.999311486103355, 0.0006885138966450789),
        (2.5, 0.999593047982555, 0.0004069520174449589),
        (3.0, 0.9999779095030014, 2.2090496998585438e-05),
        (4.5, 0.9999999998033839, 1.9661604415428873e-10),
        (6.0, 1.0, 2.1519736712498916e-17),
        (10.0, 1.0, 2.088487583762545e-45),
    ] {
        assert!((erf(x) - e).abs() < 4e-16, "erf({x}) = {} want {e}", erf(x));
        assert!((erf(-x) + e).abs() < 4e-16);
        assert!(
            (erfc(x) - ec).abs() <= 4e-15 * ec,
            "erfc({x}) = {} want {ec}",
            erfc(x)
        );
        assert!((erfc(-x) - (2.0 - ec)).abs() < 4e-16);
    }
    assert_eq!(erf(0.0), 0.0);
}

#[test]
fn activations_match_reference() {
    let Some(gpu) = gpu() else { return };
    let mut seed = 1;
    for a in ALL {
        for n in [1, 7, 50, 64, 257, 4096, 4099] {
            let mut r = Rng::new(seed);
            seed += 1;
            let x = inputs(&mut r, n);
            let dy = r.vec(n, 1.0);
            let xt = upload(&gpu, &x, &[n]);
            let y = forward(&xt, a).unwrap();
            assert_close(
                &format!("{a:?} n={n} forward"),
                &download(&y),
                &act_ref(&x, a),
                1e-6,
            );
            let dx = backward(&xt, &upload(&gpu, &dy, &[n]), a).unwrap();
            assert_close(
                &format!("{a:?} n={n} backward"),
                &download(&dx),
                &act_backward_ref(&x, &dy, a),
                1e-6,
            );
        }
    }
}

#[test]
fn gelu_dense_sweep() {
    // Every 1/1024 over [-12, 12]: all branches of erfc and tanh.
    let Some(gpu) = gpu() else { return };
    let x: Vec<f64> = (-12 * 1024..=12 * 1024)
        .map(|i| i as f64 / 1024.0)
        .collect();
    let n = x.len();
    let dy = vec![1.0; n];
    let xt = upload(&gpu, &x, &[n]);
    for a in ALL {
        assert_close(
            &format!("{a:?} sweep forward"),
            &download(&forward(&xt, a).unwrap()),
            &act_ref(&x, a),
            1e-6,
        );
        let dx = backward(&xt, &upload(&gpu, &dy, &[n]), a).unwrap();
        assert_close(
            &format!("{a:?} sweep backward"),
            &download(&dx),
            &act_backward_ref(&x, &dy, a),
            1e-6,
        );
    }
}

#[test]
fn activation_reference_backward_matches_finite_differences() {
    let mut r = Rng::new(7);
    let x = r.vec(40, 4.0);
    let w = r.vec(40, 1.0);
    for a in ALL {
        let g = act_backward_ref(&x, &w, a);
        let n = numeric_grad(&x, |v| dot(&act_ref(v, a), &w));
        let e = max_err(&g, &n);
        eprintln!("{a:?} ref backward vs finite differences: {e:.3e}");
        assert!(e < 1e-6, "{a:?}: {e:.3e}");
    }
}

#[test]
fn activation_backward_is_deterministic() {
    let Some(gpu) = gpu() else { return };
    let mut r = Rng::new(9);
    let n = 1000;
    let xt = upload(&gpu, &inputs(&mut r, n), &[n]);
    let dyt = upload(&gpu, &r.vec(n, 1.0), &[n]);
    for a in ALL {
        let run = || backward(&xt, &dyt, a).unwrap().to_vec().unwrap();
        assert!(run() == run(), "{a:?}: repeated runs differ");
    }
}

#[test]
fn activation_tape_op() {
    let Some(gpu) = gpu() else { return };
    let mut r = Rng::new(13);
    let (b, d) = (3, 77);
    let x = r.vec(b * d, 3.0);
    let dy = r.vec(b * d, 1.0);
    for a in ALL {
        let mut tape = Tape::new();
        let xv = tape.param(upload(&gpu, &x, &[b, d]));
        let y = act(&mut tape, &xv, a).unwrap();
        assert_eq!(y.shape(), &[b, d]);
        let grads = tape.backward_with(&y, upload(&gpu, &dy, &[b, d])).unwrap();
        assert_close(
            &format!("{a:?} tape dx"),
            &download(grads.get(&xv).unwrap()),
            &act_backward_ref(&x, &dy, a),
            1e-6,
        );
    }
}

#[test]
fn activation_from_hf_names() {
    assert_eq!(Act::from_hf("gelu").unwrap(), Act::Gelu);
    assert_eq!(Act::from_hf("quick_gelu").unwrap(), Act::QuickGelu);
    assert_eq!(Act::from_hf("tanh").unwrap(), Act::Tanh);
    assert_eq!(Act::from_hf("gelu_new").unwrap(), Act::GeluTanh);
    assert_eq!(Act::from_hf("gelu_pytorch_tanh").unwrap(), Act::GeluTanh);
    let e = Act::from_hf("swish").unwrap_err();
    assert!(format!("{e}").contains("\"swish\""), "{e}");
}

mod common;
use clip_wgpu::ops::layernorm::Rows;
use clip_wgpu::ops::softmax::{
    backward_with, forward_with, masked_softmax, softmax_backward_ref, softmax_ref, Mask,
};
use clip_wgpu::{Tape, Tensor};
use common::*;

const LAYOUTS: [Rows; 2] = [Rows::Thread, Rows::Workgroup];

/// A key mask with about a quarter of the keys dropped; `dead_batch` masks
/// every key of that batch entry.
fn key_valid(r: &mut Rng, b: usize, tk: usize, dead_batch: Option<usize>) -> Vec<f64> {
    (0..b * tk)
        .map(|i| {
            let dead = dead_batch == Some(i / tk);
            if dead || r.below(4) == 0 {
                0.0
            } else {
                1.0
            }
        })
        .collect()
}

#[allow(clippy::too_many_arguments)]
fn check(
    b: usize,
    h: usize,
    tq: usize,
    tk: usize,
    causal: bool,
    kv: Option<Vec<f64>>,
    scale: f64,
    seed: u64,
) {
    let Some(gpu) = gpu() else { return };
    let mut r = Rng::new(seed);
    let n = b * h * tq * tk;
    let x = r.vec(n, scale);
    let dp = r.vec(n, 1.0);
    let xt = upload(&gpu, &x, &[b, h, tq, tk]);
    let mask = Mask {
        causal,
        key_valid: kv.as_ref().map(|k| upload(&gpu, k, &[b, tk])),
        keys: None,
    };
    let want = softmax_ref(&x, b, h, tq, tk, causal, kv.as_deref());
    let dpt = upload(&gpu, &dp, &[b, h, tq, tk]);
    for layout in LAYOUTS {
        let name = format!(
            "softmax {layout:?} b{b} h{h} {tq}x{tk} causal={causal} kv={}",
            kv.is_some()
        );
        let p = forward_with(&xt, &mask, Some(layout)).unwrap();
        let got = download(&p);
        assert_close(&format!("{name} forward"), &got, &want, 1e-6);
        for (g, w) in got.iter().zip(&want) {
            if *w == 0.0 {
                assert_eq!(*g, 0.0, "{name}: a masked entry is not exactly 0");
            }
        }
        let ds = backward_with(&p, &dpt, Some(layout)).unwrap();
        let ds_ref = softmax_backward_ref(&want, &dp, b * h * tq, tk);
        assert_close(&format!("{name} backward"), &download(&ds), &ds_ref, 1e-6);
    }
}

#[test]
fn softmax_matches_reference() {
    let mut seed = 1;
    for t in [1, 50, 77] {
        for causal in [false, true] {
            for with_kv in [false, true] {
                let kv = with_kv.then(|| key_valid(&mut Rng::new(seed + 100), 2, t, None));
                check(2, 3, t, t, causal, kv, 4.0, seed);
                seed += 1;
            }
        }
    }
    // Queries and keys of different lengths, and large scores.
    check(2, 3, 7, 50, false, None, 4.0, 40);
    check(1, 2, 50, 50, true, None, 80.0, 41);
    check(
        2,
        1,
        257,
        257,
        true,
        Some(key_valid(&mut Rng::new(42), 2, 257, None)),
        8.0,
        43,
    );
}

#[test]
fn softmax_fully_masked_rows_are_zero() {
    // Batch 1 masks every key; with the causal mask, masking key 0 of batch 0
    // leaves query 0 of batch 0 with nothing to attend to.
    let (b, h, t) = (2, 3, 7);
    let mut kv = key_valid(&mut Rng::new(5), b, t, Some(1));
    kv[0] = 0.0;
    check(b, h, t, t, true, Some(kv.clone()), 4.0, 6);
    check(b, h, t, t, false, Some(kv), 4.0, 7);
    let Some(gpu) = gpu() else { return };
    let x = vec![1.0; b * h * t * t];
    let mask = Mask {
        causal: false,
        key_valid: Some(upload(&gpu, &vec![0.0; b * t], &[b, t])),
        keys: None,
    };
    for layout in LAYOUTS {
        let p = forward_with(&upload(&gpu, &x, &[b, h, t, t]), &mask, Some(layout)).unwrap();
        assert!(
            download(&p).iter().all(|&v| v == 0.0),
            "{layout:?}: fully masked rows are not all zero"
        );
    }
}

#[test]
fn softmax_many_rows_spill_into_grid_y() {
    // 70000 rows > 65535 workgroups in one dimension.
    check(1, 2, 35_000, 1, false, None, 1.0, 50);
}

#[test]
fn softmax_reference_backward_matches_finite_differences() {
    let mut r = Rng::new(8);
    let (b, h, t) = (2, 2, 5);
    let kv = key_valid(&mut r, b, t, None);
    for (causal, kv) in [(false, None), (true, None), (true, Some(&kv[..]))] {
        let x = r.vec(b * h * t * t, 2.0);
        let w = r.vec(b * h * t * t, 1.0);
        let p = softmax_ref(&x, b, h, t, t, causal, kv);
        let g = softmax_backward_ref(&p, &w, b * h * t, t);
        let n = numeric_grad(&x, |v| dot(&softmax_ref(v, b, h, t, t, causal, kv), &w));
        let e = max_err(&g, &n);
        eprintln!(
            "softmax ref backward (causal={causal}, kv={}) vs finite differences: {e:.3e}",
            kv.is_some()
        );
        assert!(e < 1e-6, "{e:.3e}");
    }
}

#[test]
fn softmax_backward_is_deterministic() {
    let Some(gpu) = gpu() else { return };
    let mut r = Rng::new(10);
    let (b, h, t) = (2, 3, 77);
    let xt = upload(&gpu, &r.vec(b * h * t * t, 3.0), &[b, h, t, t]);
    let dpt = upload(&gpu, &r.vec(b * h * t * t, 1.0), &[b, h, t, t]);
    let kv = key_valid(&mut r, b, t, None);
    let mask = Mask {
        causal: true,
        key_valid: Some(upload(&gpu, &kv, &[b, t])),
        keys: None,
    };
    for layout in LAYOUTS {
        let run = || {
            let p = forward_with(&xt, &mask, Some(layout)).unwrap();
            let ds = backward_with(&p, &dpt, Some(layout)).unwrap();
            (p.to_vec().unwrap(), ds.to_vec().unwrap())
        };
        assert!(run() == run(), "{layout:?}: repeated runs differ");
    }
}

#[test]
fn softmax_tape_op() {
    let Some(gpu) = gpu() else { return };
    let mut r = Rng::new(12);
    let (b, h, t) = (2, 3, 50);
    let x = r.vec(b * h * t * t, 3.0);
    let dp = r.vec(b * h * t * t, 1.0);
    let kv = key_valid(&mut r, b, t, None);
    let mut tape = Tape::new();
    let xv = tape.param(upload(&gpu, &x, &[b, h, t, t]));
    let mask = Mask {
        causal: true,
        key_valid: Some(Tensor::from_slice(&gpu, &to_f32(&kv), &[b, t]).unwrap()),
        keys: None,
    };
    let p = masked_softmax(&mut tape, &xv, &mask).unwrap();
    let want = softmax_ref(&x, b, h, t, t, true, Some(&kv));
    assert_close("softmax tape forward", &download(p.tensor()), &want, 1e-6);
    let grads = tape
        .backward_with(&p, upload(&gpu, &dp, &[b, h, t, t]))
        .unwrap();
    let ds_ref = softmax_backward_ref(&want, &dp, b * h * t, t);
    assert_close(
        "softmax tape dscores",
        &download(grads.get(&xv).unwrap()),
        &ds_ref,
        1e-6,
    );
}

#[test]
fn softmax_rejects_bad_shapes() {
    let Some(gpu) = gpu() else { return };
    let x = upload(&gpu, &[0.0; 24], &[2, 3, 4]);
    assert!(forward_with(&x, &Mask::none(), None).is_err());
    let x = upload(&gpu, &[0.0; 24], &[2, 1, 3, 4]);
    let mask = Mask {
        causal: false,
        key_valid: Some(upload(&gpu, &[1.0; 6], &[2, 3])),
        keys: None,
    };
    let e = forward_with(&x, &mask, None).unwrap_err();
    assert!(format!("{e:#}").contains("key_valid"), "{e:#}");
}

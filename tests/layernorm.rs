mod common;
use clip_wgpu::ops::layernorm::{
    backward_dx, backward_dx_into, backward_params, forward_with, layernorm,
    layernorm_backward_ref, layernorm_ref, Rows,
};
use clip_wgpu::Tape;
use common::*;

const EPS: f64 = 1e-5;

/// Inputs with a per-row offset and scale, as LayerNorm sees them.
fn inputs(r: &mut Rng, rows: usize, cols: usize) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let mut x = r.vec(rows * cols, 1.0);
    for row in x.chunks_mut(cols) {
        let (shift, scale) = (r.uniform() * 3.0, 0.5 + r.uniform().abs() * 2.0);
        for v in row.iter_mut() {
            *v = (*v * scale + shift) as f32 as f64;
        }
    }
    let gamma = r.vec(cols, 1.5);
    let beta = r.vec(cols, 1.0);
    (x, gamma, beta)
}

fn check(rows: usize, cols: usize, layout: Rows, seed: u64) {
    let Some(gpu) = gpu() else { return };
    let mut r = Rng::new(seed);
    let (x, gamma, beta) = inputs(&mut r, rows, cols);
    let dy = r.vec(rows * cols, 1.0);
    let xt = upload(&gpu, &x, &[rows, cols]);
    let gt = upload(&gpu, &gamma, &[cols]);
    let bt = upload(&gpu, &beta, &[cols]);
    let (y, mean, rstd) = forward_with(&xt, &gt, &bt, EPS as f32, Some(layout)).unwrap();
    let name = format!("layernorm {layout:?} {rows}x{cols}");
    assert_close(
        &format!("{name} forward"),
        &download(&y),
        &layernorm_ref(&x, &gamma, &beta, cols, EPS),
        2e-5,
    );
    let dyt = upload(&gpu, &dy, &[rows, cols]);
    let dx = backward_dx(&dyt, &xt, &gt, &mean, &rstd, Some(layout)).unwrap();
    let (dg, db) = backward_params(&dyt, &xt, &mean, &rstd).unwrap();
    let (dx_ref, dg_ref, db_ref) = layernorm_backward_ref(&dy, &x, &gamma, cols, EPS);
    assert_close(&format!("{name} dx"), &download(&dx), &dx_ref, 5e-5);
    // Added into a pending gradient (the tape's in-place accumulation).
    let pending = r.vec(rows * cols, 1.0);
    let pt = upload(&gpu, &pending, &[rows, cols]);
    let sum = backward_dx_into(&dyt, &xt, &gt, &mean, &rstd, Some(layout), Some(pt)).unwrap();
    let want: Vec<f64> = dx_ref.iter().zip(&pending).map(|(a, b)| a + b).collect();
    assert_close(&format!("{name} dx added"), &download(&sum), &want, 5e-5);
    let tol = 1e-5 * (rows as f64).sqrt().max(1.0);
    assert_close(&format!("{name} dgamma"), &download(&dg), &dg_ref, tol);
    assert_close(&format!("{name} dbeta"), &download(&db), &db_ref, tol);
}

#[test]
fn layernorm_matches_reference_odd_sizes() {
    let mut seed = 1;
    for &rows in &[1, 7, 50, 100] {
        // 4, 128: whole vec4s (the vec4 row kernels on the thread layout).
        for &cols in &[4, 7, 50, 77, 128, 257] {
            for layout in [Rows::Thread, Rows::Workgroup] {
                check(rows, cols, layout, seed);
                seed += 1;
            }
        }
    }
}

#[test]
fn layernorm_tall_input_two_stage_param_reduction() {
    // > 256 chunks of 64 rows: the column sum runs in two passes.
    check(17_000, 7, Rows::Thread, 77);
    check(17_000, 8, Rows::Thread, 80);
    check(300, 768, Rows::Workgroup, 78);
    check(300, 768, Rows::Thread, 79);
}

#[test]
fn layernorm_reference_backward_matches_finite_differences() {
    let mut r = Rng::new(3);
    let (rows, cols) = (3, 7);
    let (x, gamma, beta) = inputs(&mut r, rows, cols);
    let w = r.vec(rows * cols, 1.0);
    let (dx, dg, db) = layernorm_backward_ref(&w, &x, &gamma, cols, EPS);
    let nx = numeric_grad(&x, |v| dot(&layernorm_ref(v, &gamma, &beta, cols, EPS), &w));
    let ng = numeric_grad(&gamma, |v| dot(&layernorm_ref(&x, v, &beta, cols, EPS), &w));
    let nb = numeric_grad(&beta, |v| dot(&layernorm_ref(&x, &gamma, v, cols, EPS), &w));
    for (what, a, n) in [("dx", &dx, &nx), ("dgamma", &dg, &ng), ("dbeta", &db, &nb)] {
        let e = max_err(a, n);
        eprintln!("layernorm ref {what} vs finite differences: {e:.3e}");
        assert!(e < 1e-6, "{what}: {e:.3e}");
    }
}

#[test]
fn layernorm_backward_is_deterministic() {
    let Some(gpu) = gpu() else { return };
    let mut r = Rng::new(11);
    let (rows, cols) = (1000, 77);
    let (x, gamma, beta) = inputs(&mut r, rows, cols);
    let dy = r.vec(rows * cols, 1.0);
    let (xt, gt, bt) = (
        upload(&gpu, &x, &[rows, cols]),
        upload(&gpu, &gamma, &[cols]),
        upload(&gpu, &beta, &[cols]),
    );
    let dyt = upload(&gpu, &dy, &[rows, cols]);
    for layout in [Rows::Thread, Rows::Workgroup] {
        let run = || {
            let (y, mean, rstd) = forward_with(&xt, &gt, &bt, EPS as f32, Some(layout)).unwrap();
            let dx = backward_dx(&dyt, &xt, &gt, &mean, &rstd, Some(layout)).unwrap();
            let (dg, db) = backward_params(&dyt, &xt, &mean, &rstd).unwrap();
            [y, dx, dg, db].map(|t| t.to_vec().unwrap())
        };
        assert!(run() == run(), "{layout:?}: repeated runs differ");
    }
}

#[test]
fn layernorm_tape_gradients() {
    let Some(gpu) = gpu() else { return };
    let mut r = Rng::new(21);
    let (b, t, cols) = (2, 5, 50);
    let (x, gamma, beta) = inputs(&mut r, b * t, cols);
    let dy = r.vec(b * t * cols, 1.0);
    let mut tape = Tape::new();
    let xv = tape.param(upload(&gpu, &x, &[b, t, cols]));
    let gv = tape.param(upload(&gpu, &gamma, &[cols]));
    let bv = tape.param(upload(&gpu, &beta, &[cols]));
    let y = layernorm(&mut tape, &xv, &gv, &bv, EPS as f32).unwrap();
    assert_eq!(y.shape(), &[b, t, cols]);
    assert_close(
        "layernorm tape forward",
        &download(y.tensor()),
        &layernorm_ref(&x, &gamma, &beta, cols, EPS),
        2e-5,
    );
    let grads = tape
        .backward_with(&y, upload(&gpu, &dy, &[b, t, cols]))
        .unwrap();
    let (dx_ref, dg_ref, db_ref) = layernorm_backward_ref(&dy, &x, &gamma, cols, EPS);
    assert_close(
        "layernorm tape dx",
        &download(grads.get(&xv).unwrap()),
        &dx_ref,
        5e-5,
    );
    assert_close(
        "layernorm tape dgamma",
        &download(grads.get(&gv).unwrap()),
        &dg_ref,
        5e-5,
    );
    assert_close(
        "layernorm tape dbeta",
        &download(grads.get(&bv).unwrap()),
        &db_ref,
        5e-5,
    );
    assert_eq!(grads.get(&xv).unwrap().shape(), &[b, t, cols]);
}

#[test]
fn layernorm_rejects_mismatched_shapes() {
    let Some(gpu) = gpu() else { return };
    let x = upload(&gpu, &[0.0; 12], &[3, 4]);
    let g = upload(&gpu, &[1.0; 5], &[5]);
    let b = upload(&gpu, &[0.0; 4], &[4]);
    let e = forward_with(&x, &g, &b, 1e-5, None).unwrap_err();
    assert!(format!("{e:#}").contains("gamma"), "{e:#}");
}

/// The residual add folded into the layer norm (one kernel for whole-vec4
/// rows, else add then layer norm) against add_var + layernorm: both
/// outputs and every gradient, with both outputs used downstream.
#[test]
fn add_layernorm_matches_separate_ops() {
    use clip_wgpu::ops::elementwise::add_var;
    use clip_wgpu::ops::layernorm::{add_layernorm, layernorm};
    use clip_wgpu::Tape;
    let Some(gpu) = gpu() else { return };
    let mut r = Rng::new(31);
    for (rows, cols) in [(37, 128), (5, 7)] {
        let (x, gamma, beta) = inputs(&mut r, rows, cols);
        let o = r.vec(rows * cols, 1.0);
        let dh = r.vec(rows * cols, 1.0);
        let run = |fused: bool| {
            let mut tape = Tape::new();
            let xv = tape.param(upload(&gpu, &x, &[rows, cols]));
            let ov = tape.param(upload(&gpu, &o, &[rows, cols]));
            let gv = tape.param(upload(&gpu, &gamma, &[cols]));
            let bv = tape.param(upload(&gpu, &beta, &[cols]));
            let (s, h) = if fused {
                add_layernorm(&mut tape, &xv, &ov, &gv, &bv, 1e-5).unwrap()
            } else {
                let s = add_var(&mut tape, &xv, &ov).unwrap();
                let h = layernorm(&mut tape, &s, &gv, &bv, 1e-5).unwrap();
                (s, h)
            };
            // L = sum((s + h) * dh): gradients reach s both directly and
            // through the layer norm.
            let (sv, hv) = (download(s.tensor()), download(h.tensor()));
            let total = add_var(&mut tape, &s, &h).unwrap();
            let mut g = tape
                .backward_with(&total, upload(&gpu, &dh, &[rows, cols]))
                .unwrap();
            let grads: Vec<Vec<f64>> = [&xv, &ov, &gv, &bv]
                .iter()
                .map(|v| download(&g.take(v).unwrap()))
                .collect();
            (sv, hv, grads)
        };
        let (sf, hf, gf) = run(true);
        let (ss, hs, gs) = run(false);
        let name = format!("add_layernorm {rows}x{cols}");
        assert_close(&format!("{name} sum"), &sf, &ss, 0.0);
        assert_close(&format!("{name} norm"), &hf, &hs, 1e-6);
        for (i, (f, s)) in gf.iter().zip(&gs).enumerate() {
            assert_close(&format!("{name} grad {i}"), f, s, 1e-6);
        }
    }
}

mod common;
use clip_wgpu::ops::l2norm::{
    backward_with, forward_with, l2_normalize, l2_normalize_backward_ref, l2_normalize_ref,
};
use clip_wgpu::ops::layernorm::Rows;
use clip_wgpu::Tape;
use common::*;

const LAYOUTS: [Rows; 2] = [Rows::Thread, Rows::Workgroup];

/// dx scaled by each row's norm: dx is O(|dy| / ||x||), so this puts rows of
/// every magnitude on one scale for the comparison.
fn scaled(dx: &[f64], x: &[f64], cols: usize) -> Vec<f64> {
    dx.iter()
        .zip(x.chunks(cols).flat_map(|row| {
            let n = row.iter().map(|v| v * v).sum::<f64>().sqrt();
            std::iter::repeat_n(n, cols)
        }))
        .map(|(d, n)| d * n)
        .collect()
}

/// Rows of very different magnitudes.
fn inputs(r: &mut Rng, rows: usize, cols: usize) -> Vec<f64> {
    let mut x = r.vec(rows * cols, 1.0);
    for row in x.chunks_mut(cols) {
        let scale = 10f64.powf(r.uniform() * 3.0);
        for v in row.iter_mut() {
            *v = (*v * scale) as f32 as f64;
        }
    }
    x
}

#[test]
fn l2norm_matches_reference() {
    let Some(gpu) = gpu() else { return };
    let mut seed = 1;
    for rows in [1, 7, 50, 100] {
        for cols in [1, 7, 50, 77, 257, 512] {
            let mut r = Rng::new(seed);
            seed += 1;
            let x = inputs(&mut r, rows, cols);
            let dy = r.vec(rows * cols, 1.0);
            let xt = upload(&gpu, &x, &[rows, cols]);
            let dyt = upload(&gpu, &dy, &[rows, cols]);
            for layout in LAYOUTS {
                let name = format!("l2norm {layout:?} {rows}x{cols}");
                let (y, norm) = forward_with(&xt, Some(layout)).unwrap();
                assert_close(
                    &format!("{name} forward"),
                    &download(&y),
                    &l2_normalize_ref(&x, cols),
                    1e-6,
                );
                let dx = backward_with(&dyt, &y, &norm, Some(layout)).unwrap();
                let want = l2_normalize_backward_ref(&x, &dy, cols);
                assert_close(
                    &format!("{name} backward"),
                    &scaled(&download(&dx), &x, cols),
                    &scaled(&want, &x, cols),
                    1e-6,
                );
            }
        }
    }
}

#[test]
fn l2norm_reference_backward_matches_finite_differences() {
    let mut r = Rng::new(4);
    let (rows, cols) = (3, 7);
    let x = r.vec(rows * cols, 1.0);
    let w = r.vec(rows * cols, 1.0);
    let g = l2_normalize_backward_ref(&x, &w, cols);
    let n = numeric_grad(&x, |v| dot(&l2_normalize_ref(v, cols), &w));
    let e = max_err(&g, &n);
    eprintln!("l2norm ref backward vs finite differences: {e:.3e}");
    assert!(e < 1e-6, "{e:.3e}");
}

#[test]
fn l2norm_backward_is_deterministic() {
    let Some(gpu) = gpu() else { return };
    let mut r = Rng::new(6);
    let (rows, cols) = (64, 512);
    let xt = upload(&gpu, &inputs(&mut r, rows, cols), &[rows, cols]);
    let dyt = upload(&gpu, &r.vec(rows * cols, 1.0), &[rows, cols]);
    for layout in LAYOUTS {
        let run = || {
            let (y, norm) = forward_with(&xt, Some(layout)).unwrap();
            let dx = backward_with(&dyt, &y, &norm, Some(layout)).unwrap();
            (y.to_vec().unwrap(), dx.to_vec().unwrap())
        };
        assert!(run() == run(), "{layout:?}: repeated runs differ");
    }
}

#[test]
fn l2norm_tape_op() {
    let Some(gpu) = gpu() else { return };
    let mut r = Rng::new(7);
    let (rows, cols) = (5, 77);
    let x = inputs(&mut r, rows, cols);
    let dy = r.vec(rows * cols, 1.0);
    let mut tape = Tape::new();
    let xv = tape.param(upload(&gpu, &x, &[rows, cols]));
    let y = l2_normalize(&mut tape, &xv).unwrap();
    assert_close(
        "l2norm tape forward",
        &download(y.tensor()),
        &l2_normalize_ref(&x, cols),
        1e-6,
    );
    let grads = tape
        .backward_with(&y, upload(&gpu, &dy, &[rows, cols]))
        .unwrap();
    let want = l2_normalize_backward_ref(&x, &dy, cols);
    assert_close(
        "l2norm tape dx",
        &scaled(&download(grads.get(&xv).unwrap()), &x, cols),
        &scaled(&want, &x, cols),
        1e-6,
    );
}

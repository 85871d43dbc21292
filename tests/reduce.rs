//! Deterministic reductions: column sums (one pass, two passes for tall
//! inputs, accumulating) and sums of squares, on the scalar kernels and the
//! vec4 ones (taken when the sizes are multiples of 4), against f64 sums.
mod common;
use clip_wgpu::gpu::settings::Rows;
use clip_wgpu::ops::reduce::{colsum, colsum_into, colsum_ref, sumsq, sumsq_with};
use common::*;

#[test]
fn colsum_matches_reference() {
    let Some(gpu) = gpu() else { return };
    let mut r = Rng::new(11);
    for (rows, cols) in [(1, 4), (7, 13), (100, 128), (1000, 12), (1000, 7), (300, 1)] {
        let x = r.vec(rows * cols, 1.0);
        let xt = upload(&gpu, &x, &[rows, cols]);
        let want = colsum_ref(&x, rows, cols);
        let tol = 1e-6 * (rows as f64).sqrt();
        assert_close(
            &format!("colsum {rows}x{cols}"),
            &download(&colsum(&xt, rows, cols).unwrap()),
            &want,
            tol,
        );
        // Accumulating onto existing values.
        let base = r.vec(cols, 1.0);
        let out = upload(&gpu, &base, &[cols]);
        colsum_into(&xt, rows, cols, &out, true).unwrap();
        let want: Vec<f64> = want.iter().zip(&base).map(|(a, b)| a + b).collect();
        assert_close(
            &format!("colsum += {rows}x{cols}"),
            &download(&out),
            &want,
            tol,
        );
    }
}

#[test]
fn sumsq_matches_reference() {
    let Some(gpu) = gpu() else { return };
    let mut r = Rng::new(12);
    for n in [1, 3, 256, 1024, 70_000, 70_001] {
        let x = r.vec(n, 1.0);
        let xt = upload(&gpu, &x, &[n]);
        let want: f64 = x.iter().map(|v| v * v).sum();
        let got = download(&sumsq(&xt).unwrap());
        assert_close(&format!("sumsq n={n}"), &got, &[want], 1e-6);
        // Both layouts (a thread a chunk; a workgroup a chunk on GPUs).
        for layout in [Rows::Thread, Rows::Workgroup] {
            let got = download(&sumsq_with(&xt, Some(layout)).unwrap());
            assert_close(&format!("sumsq {layout:?} n={n}"), &got, &[want], 1e-6);
        }
    }
}

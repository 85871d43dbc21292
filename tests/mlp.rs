//! The fused MLP op (activation in fc1's matmul epilogue, its derivative in
//! the epilogue of the dH matmul) against linear -> act -> linear, forward
//! and every gradient, for each activation the epilogues have; 4-aligned
//! sizes (fused) and not (fallback), with and without biases.
mod common;
use clip_wgpu::ops::activation::{act, Act};
use clip_wgpu::ops::matmul::linear;
use clip_wgpu::ops::mlp::mlp;
use clip_wgpu::Tape;
use common::*;

#[test]
fn mlp_matches_separate_ops() {
    let Some(gpu) = gpu() else { return };
    let mut r = Rng::new(41);
    for (rows, d, f, d2) in [(70, 32, 64, 32), (13, 7, 9, 5)] {
        for (a, bias) in [
            (Act::QuickGelu, true),
            (Act::Gelu, false),
            (Act::Tanh, false),
            (Act::GeluTanh, true),
        ] {
            let x = r.vec(rows * d, 1.0);
            let (w1, b1) = (r.vec(f * d, 0.5), r.vec(f, 0.5));
            let (w2, b2) = (r.vec(d2 * f, 0.5), r.vec(d2, 0.5));
            let dy = r.vec(rows * d2, 1.0);
            // `grad` false: a tape with no backward (the forward alone).
            let run = |fused: bool, grad: bool| {
                let mut tape = if grad { Tape::new() } else { Tape::no_grad() };
                let xv = tape.param(upload(&gpu, &x, &[rows, d]));
                let w1v = tape.param(upload(&gpu, &w1, &[f, d]));
                let b1v = tape.param(upload(&gpu, &b1, &[f]));
                let w2v = tape.param(upload(&gpu, &w2, &[d2, f]));
                let b2v = tape.param(upload(&gpu, &b2, &[d2]));
                let (b1o, b2o) = (bias.then_some(&b1v), bias.then_some(&b2v));
                let y = if fused {
                    mlp(&mut tape, &xv, (&w1v, b1o), (&w2v, b2o), a).unwrap()
                } else {
                    let h = linear(&mut tape, &xv, &w1v, b1o).unwrap();
                    let h = act(&mut tape, &h, a).unwrap();
                    linear(&mut tape, &h, &w2v, b2o).unwrap()
                };
                let yv = download(y.tensor());
                if !grad {
                    return (yv, Vec::new());
                }
                let mut g = tape
                    .backward_with(&y, upload(&gpu, &dy, &[rows, d2]))
                    .unwrap();
                let mut vars = vec![&xv, &w1v, &w2v];
                if bias {
                    vars.extend([&b1v, &b2v]);
                }
                let grads: Vec<Vec<f64>> =
                    vars.iter().map(|v| download(&g.take(v).unwrap())).collect();
                (yv, grads)
            };
            let (yf, gf) = run(true, true);
            let (ys, gs) = run(false, true);
            let name = format!("mlp {rows}x{d}->{f}->{d2} {a:?} bias={bias}");
            assert_close(&format!("{name} forward"), &yf, &ys, 1e-6);
            // With no backward the activation replaces the pre-activation
            // in fc1's output (ACT 3): the same values, bit for bit.
            assert!(run(true, false).0 == yf, "{name}: no-grad forward differs");
            for (i, (fg, sg)) in gf.iter().zip(&gs).enumerate() {
                assert_close(&format!("{name} grad {i}"), fg, sg, 1e-6);
            }
        }
    }
}

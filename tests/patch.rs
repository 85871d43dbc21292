mod common;
use clip_wgpu::ops::patch::{patch_embed, patch_embed_backward_ref, patch_embed_ref, PatchDims};
use clip_wgpu::Tape;
use common::*;

fn dims(b: usize, c: usize, h: usize, w: usize, p: usize, d: usize) -> PatchDims {
    PatchDims { b, c, h, w, p, d }
}

/// (out, dpixels, dweight) from the GPU.
fn run(px: &[f64], wt: &[f64], dy: &[f64], g: PatchDims) -> [Vec<f32>; 3] {
    let gpu = gpu().unwrap();
    let mut tape = Tape::new();
    let pv = tape.param(upload(&gpu, px, &[g.b, g.c, g.h, g.w]));
    let wv = tape.param(upload(&gpu, wt, &[g.d, g.c, g.p, g.p]));
    let out = patch_embed(&mut tape, &pv, &wv, g.p).unwrap();
    assert_eq!(out.shape(), &[g.b, g.np(), g.d]);
    let grads = tape
        .backward_with(&out, upload(&gpu, dy, &[g.b, g.np(), g.d]))
        .unwrap();
    assert_eq!(grads.get(&pv).unwrap().shape(), &[g.b, g.c, g.h, g.w]);
    assert_eq!(grads.get(&wv).unwrap().shape(), &[g.d, g.c, g.p, g.p]);
    [
        out.tensor().to_vec().unwrap(),
        grads.get(&pv).unwrap().to_vec().unwrap(),
        grads.get(&wv).unwrap().to_vec().unwrap(),
    ]
}

#[test]
fn patch_embed_matches_reference() {
    if gpu().is_none() {
        return;
    }
    let mut r = Rng::new(1);
    for g in [
        dims(2, 3, 20, 20, 7, 50), // P = 4, trailing 6 rows/columns ignored
        dims(2, 3, 64, 64, 8, 50), // P = 64
        dims(1, 1, 7, 7, 7, 1),
        dims(3, 2, 20, 33, 5, 7), // non-square, trailing columns
        dims(1, 3, 32, 32, 16, 77),
        dims(2, 3, 20, 36, 8, 9), // four columns a thread, trailing rows
        dims(2, 3, 17, 18, 4, 9), // p % 4 == 0 but w % 4 != 0: one a thread
    ] {
        let px = r.vec(g.b * g.c * g.h * g.w, 1.0);
        let wt = r.vec(g.d * g.k(), 1.0);
        let dy = r.vec(g.b * g.np() * g.d, 1.0);
        let got = run(&px, &wt, &dy, g);
        let f = |x: &[f32]| x.iter().map(|&a| a as f64).collect::<Vec<_>>();
        let name = format!("patch B{} C{} {}x{} p{} D{}", g.b, g.c, g.h, g.w, g.p, g.d);
        let out_ref = patch_embed_ref(&px, &wt, g);
        assert_close(
            &format!("{name} forward"),
            &f(&got[0]),
            &out_ref,
            1e-5 * (g.k() as f64).sqrt(),
        );
        let (dpx, dw) = patch_embed_backward_ref(&dy, &px, &wt, g);
        assert_close(
            &format!("{name} dpixels"),
            &f(&got[1]),
            &dpx,
            1e-5 * (g.d as f64).sqrt(),
        );
        assert_close(
            &format!("{name} dweight"),
            &f(&got[2]),
            &dw,
            1e-5 * ((g.b * g.np()) as f64).sqrt(),
        );
        // Pixels no patch covers get exactly zero.
        for (i, &v) in got[1].iter().enumerate() {
            let (x, y) = (i % g.w, (i / g.w) % g.h);
            if x >= g.gw() * g.p || y >= g.gh() * g.p {
                assert_eq!(v, 0.0, "{name}: uncovered pixel has gradient");
            }
        }
        let again = run(&px, &wt, &dy, g);
        assert!(got == again, "{name}: runs differ");
    }
}

#[test]
fn patch_embed_frozen_pixels_get_no_gradient() {
    let Some(gpu) = gpu() else { return };
    let mut r = Rng::new(2);
    let g = dims(2, 3, 9, 9, 4, 5);
    let px = r.vec(g.b * g.c * g.h * g.w, 1.0);
    let wt = r.vec(g.d * g.k(), 1.0);
    let mut tape = Tape::new();
    let pv = tape.frozen(upload(&gpu, &px, &[g.b, g.c, g.h, g.w]));
    let wv = tape.param(upload(&gpu, &wt, &[g.d, g.c, g.p, g.p]));
    let out = patch_embed(&mut tape, &pv, &wv, g.p).unwrap();
    let dy = r.vec(g.b * g.np() * g.d, 1.0);
    let grads = tape
        .backward_with(&out, upload(&gpu, &dy, &[g.b, g.np(), g.d]))
        .unwrap();
    assert_eq!(grads.len(), 1);
    let (_, dw) = patch_embed_backward_ref(&dy, &px, &wt, g);
    assert_close(
        "patch frozen pixels dweight",
        &download(grads.get(&wv).unwrap()),
        &dw,
        1e-5,
    );
}

#[test]
fn patch_embed_rejects_bad_shapes() {
    let Some(gpu) = gpu() else { return };
    let mut tape = Tape::new();
    let px = tape.frozen(upload(&gpu, &[0.0; 2 * 3 * 6 * 6], &[2, 3, 6, 6]));
    let w_bad_c = tape.param(upload(&gpu, &[0.0; 4 * 2 * 3 * 3], &[4, 2, 3, 3]));
    assert!(patch_embed(&mut tape, &px, &w_bad_c, 3).is_err());
    let w_big = tape.param(upload(&gpu, &[0.0; 4 * 3 * 7 * 7], &[4, 3, 7, 7]));
    assert!(patch_embed(&mut tape, &px, &w_big, 7).is_err());
    let w_ok = tape.param(upload(&gpu, &[0.0; 4 * 3 * 3 * 3], &[4, 3, 3, 3]));
    assert!(patch_embed(&mut tape, &px, &w_ok, 4).is_err());
    assert!(patch_embed(&mut tape, &px, &w_ok, 3).is_ok());
}

#[test]
fn patch_reference_backward_matches_finite_differences() {
    let mut r = Rng::new(3);
    let g = dims(2, 2, 5, 7, 2, 3); // trailing row and column
    let px = r.vec(g.b * g.c * g.h * g.w, 1.0);
    let wt = r.vec(g.d * g.k(), 1.0);
    let w = r.vec(g.b * g.np() * g.d, 1.0);
    let (dpx, dw) = patch_embed_backward_ref(&w, &px, &wt, g);
    let npx = numeric_grad(&px, |x| dot(&patch_embed_ref(x, &wt, g), &w));
    let nw = numeric_grad(&wt, |x| dot(&patch_embed_ref(&px, x, g), &w));
    assert!(
        max_err(&dpx, &npx) < 1e-6,
        "dpixels vs fd: {:.3e}",
        max_err(&dpx, &npx)
    );
    assert!(
        max_err(&dw, &nw) < 1e-6,
        "dweight vs fd: {:.3e}",
        max_err(&dw, &nw)
    );
}

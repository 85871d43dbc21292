mod common;
use clip_wgpu::ops::loss::{
    clip_logits_ref, clip_loss, clip_loss_backward_ref, clip_loss_ref, contrastive_loss,
    BLOCKED_ABOVE,
};
use clip_wgpu::ops::loss_blocked::clip_loss_blocked;
use clip_wgpu::ops::loss_local::{row_ce, row_ce_ref};
use clip_wgpu::{Tape, Tensor};
use common::*;

/// n random rows of length e, each scaled to unit L2 norm (as the caller does).
fn unit_rows(r: &mut Rng, n: usize, e: usize) -> Vec<f64> {
    let mut x = r.vec(n * e, 1.0);
    for row in x.chunks_mut(e) {
        let norm = row.iter().map(|v| v * v).sum::<f64>().sqrt();
        row.iter_mut().for_each(|v| *v = (*v / norm) as f32 as f64);
    }
    x
}

/// GPU (loss, logits_per_text, logits_per_image, dI, dT, ds).
fn run(i: &[f64], t: &[f64], s: f64, n: usize, e: usize, dy: f64) -> [Vec<f32>; 6] {
    let gpu = gpu().unwrap();
    let mut tape = Tape::new();
    let iv = tape.param(upload(&gpu, i, &[n, e]));
    let tv = tape.param(upload(&gpu, t, &[n, e]));
    let sv = tape.param(upload(&gpu, &[s], &[1]));
    let out = clip_loss(&mut tape, &iv, &tv, &sv).unwrap();
    assert_eq!(out.loss.shape(), &[1]);
    assert_eq!(out.logits_per_text.shape(), &[n, n]);
    let lpi = out.logits_per_image().unwrap();
    let g = tape
        .backward_with(
            &out.loss,
            Tensor::from_slice(&gpu, &[dy as f32], &[1]).unwrap(),
        )
        .unwrap();
    assert_eq!(g.get(&sv).unwrap().shape(), &[1]);
    [
        out.loss.tensor().to_vec().unwrap(),
        out.logits_per_text.to_vec().unwrap(),
        lpi.to_vec().unwrap(),
        g.get(&iv).unwrap().to_vec().unwrap(),
        g.get(&tv).unwrap().to_vec().unwrap(),
        g.get(&sv).unwrap().to_vec().unwrap(),
    ]
}

fn f(x: &[f32]) -> Vec<f64> {
    x.iter().map(|&a| a as f64).collect()
}

#[test]
fn clip_loss_matches_reference() {
    if gpu().is_none() {
        return;
    }
    let mut r = Rng::new(1);
    // s = ln(1/0.07) is CLIP's initial scale; ln(100) is its clamp, where the
    // softmaxes are sharp (a test of the stable log-sum-exp).
    for &(n, e, s) in &[
        (1, 7, 2.6592),
        (7, 7, 2.6592),
        (7, 33, 4.6052),
        (50, 33, 2.6592),
        (50, 7, 4.6052),
        (300, 33, 2.6592), // several row chunks, two-pass ds sum, 2N > 256
    ] {
        let s = s as f32 as f64;
        let i = unit_rows(&mut r, n, e);
        let t = unit_rows(&mut r, n, e);
        let dy = 0.7;
        let got = run(&i, &t, s, n, e, dy);
        let name = format!("clip_loss N{n} E{e} s{s:.2}");
        let z = clip_logits_ref(&i, &t, s, n, e);
        let zt: Vec<f64> = (0..n * n).map(|k| z[(k % n) * n + k / n]).collect();
        assert_close(
            &format!("{name} loss"),
            &f(&got[0]),
            &[clip_loss_ref(&i, &t, s, n, e)],
            2e-6,
        );
        // The logits are exp(s) (up to 100) times an f32 dot product, so its
        // rounding error grows that much on logits that may be near zero,
        // and the sharp softmaxes pass it on to the gradients.
        assert_close(&format!("{name} logits_per_text"), &f(&got[1]), &z, 1e-5);
        assert_close(&format!("{name} logits_per_image"), &f(&got[2]), &zt, 1e-5);
        let (di, dt, ds) = clip_loss_backward_ref(&i, &t, s, n, e, dy);
        assert_close(&format!("{name} dimage"), &f(&got[3]), &di, 1e-5);
        assert_close(&format!("{name} dtext"), &f(&got[4]), &dt, 1e-5);
        assert_close(&format!("{name} dscale"), &f(&got[5]), &[ds], 1e-5);
        let again = run(&i, &t, s, n, e, dy);
        assert!(got == again, "{name}: runs differ");
    }
}

#[test]
fn clip_loss_frozen_scale_and_no_grad() {
    let Some(gpu) = gpu() else { return };
    let mut r = Rng::new(2);
    let (n, e, s) = (5, 4, 1.5f32 as f64);
    let (i, t) = (unit_rows(&mut r, n, e), unit_rows(&mut r, n, e));
    let mut tape = Tape::new();
    let iv = tape.param(upload(&gpu, &i, &[n, e]));
    let tv = tape.frozen(upload(&gpu, &t, &[n, e]));
    let sv = tape.frozen(upload(&gpu, &[s], &[1]));
    let out = clip_loss(&mut tape, &iv, &tv, &sv).unwrap();
    let g = tape.backward(&out.loss).unwrap();
    assert_eq!(g.len(), 1);
    let (di, _, _) = clip_loss_backward_ref(&i, &t, s, n, e, 1.0);
    assert_close(
        "clip_loss image-only dimage",
        &download(g.get(&iv).unwrap()),
        &di,
        2e-6,
    );

    let mut eval = Tape::no_grad();
    let iv = eval.param(upload(&gpu, &i, &[n, e]));
    let tv = eval.param(upload(&gpu, &t, &[n, e]));
    let sv = eval.param(upload(&gpu, &[s], &[1]));
    let out = clip_loss(&mut eval, &iv, &tv, &sv).unwrap();
    assert!(eval.is_empty());
    assert_close(
        "clip_loss eval",
        &download(out.loss.tensor()),
        &[clip_loss_ref(&i, &t, s, n, e)],
        2e-6,
    );
}

#[test]
fn clip_loss_rejects_bad_shapes() {
    let Some(gpu) = gpu() else { return };
    let mut tape = Tape::new();
    let a = tape.param(upload(&gpu, &[0.0; 12], &[3, 4]));
    let b = tape.param(upload(&gpu, &[0.0; 12], &[4, 3]));
    let s = tape.param(upload(&gpu, &[0.0], &[1]));
    let s2 = tape.param(upload(&gpu, &[0.0; 2], &[2]));
    assert!(clip_loss(&mut tape, &a, &b, &s).is_err());
    assert!(clip_loss(&mut tape, &a, &a, &s2).is_err());
}

#[test]
fn clip_loss_reference_backward_matches_finite_differences() {
    let mut r = Rng::new(3);
    for &(n, e) in &[(1, 3), (4, 3), (6, 5)] {
        let i = r.vec(n * e, 1.0);
        let t = r.vec(n * e, 1.0);
        let s = 1.3;
        let dy = 0.7;
        let (di, dt, ds) = clip_loss_backward_ref(&i, &t, s, n, e, dy);
        let ni = numeric_grad(&i, |x| dy * clip_loss_ref(x, &t, s, n, e));
        let nt = numeric_grad(&t, |x| dy * clip_loss_ref(&i, x, s, n, e));
        let ns = numeric_grad(&[s], |x| dy * clip_loss_ref(&i, &t, x[0], n, e));
        for (what, a, b) in [("dI", &di, &ni), ("dT", &dt, &nt), ("ds", &vec![ds], &ns)] {
            let err = max_err(a, b);
            assert!(err < 1e-6, "clip_loss ref {what} N{n} vs fd: {err:.3e}");
        }
    }
}

/// The blocked loss (logits made a block of text rows at a time, as the
/// full-batch loss of accumulation runs above 1,024 pairs) against the CPU
/// reference: loss and every gradient, for blocks that divide N, that do
/// not (a short last block), of one row, and one block of all rows; the
/// image gradient is accumulated over blocks and the text one written
/// per block.
#[test]
fn blocked_clip_loss_matches_reference() {
    let Some(gpu) = gpu() else { return };
    let mut r = Rng::new(9);
    for &(n, e, s, rows) in &[
        (12, 7, 2.6592, 4),
        (17, 33, 4.6052, 5),
        (9, 8, 2.6592, 1),
        (300, 33, 2.6592, 64),
        (40, 16, 3.0, 40),
    ] {
        let s = s as f32 as f64;
        let i = unit_rows(&mut r, n, e);
        let t = unit_rows(&mut r, n, e);
        let dy = 0.7;
        let mut tape = Tape::new();
        let iv = tape.param(upload(&gpu, &i, &[n, e]));
        let tv = tape.param(upload(&gpu, &t, &[n, e]));
        let sv = tape.param(upload(&gpu, &[s], &[1]));
        let loss = clip_loss_blocked(&mut tape, &iv, &tv, &sv, rows).unwrap();
        let g = tape
            .backward_with(&loss, Tensor::from_slice(&gpu, &[dy as f32], &[1]).unwrap())
            .unwrap();
        let name = format!("blocked clip_loss N{n} E{e} s{s:.2} rows {rows}");
        assert_close(
            &format!("{name} loss"),
            &download(loss.tensor()),
            &[clip_loss_ref(&i, &t, s, n, e)],
            2e-6,
        );
        let (di, dt, ds) = clip_loss_backward_ref(&i, &t, s, n, e, dy);
        assert_close(
            &format!("{name} dimage"),
            &download(g.get(&iv).unwrap()),
            &di,
            1e-5,
        );
        assert_close(
            &format!("{name} dtext"),
            &download(g.get(&tv).unwrap()),
            &dt,
            1e-5,
        );
        assert_close(
            &format!("{name} dscale"),
            &download(g.get(&sv).unwrap()),
            &[ds],
            1e-5,
        );
    }
}

/// `contrastive_loss` takes the blocked path above 1,024 pairs: the same
/// loss and gradients as the whole-logits one there.
#[test]
fn contrastive_loss_switches_to_blocks_with_the_same_result() {
    let Some(gpu) = gpu() else { return };
    let mut r = Rng::new(10);
    let (n, e, s) = (BLOCKED_ABOVE + 37, 8, 2.6592f32 as f64);
    let (i, t) = (unit_rows(&mut r, n, e), unit_rows(&mut r, n, e));
    let grads = |blocked: bool| {
        let mut tape = Tape::new();
        let iv = tape.param(upload(&gpu, &i, &[n, e]));
        let tv = tape.param(upload(&gpu, &t, &[n, e]));
        let sv = tape.param(upload(&gpu, &[s], &[1]));
        let loss = if blocked {
            contrastive_loss(&mut tape, &iv, &tv, &sv).unwrap()
        } else {
            clip_loss(&mut tape, &iv, &tv, &sv).unwrap().loss
        };
        let g = tape.backward(&loss).unwrap();
        [
            download(loss.tensor()),
            download(g.get(&iv).unwrap()),
            download(g.get(&tv).unwrap()),
            download(g.get(&sv).unwrap()),
        ]
    };
    let (b, w) = (grads(true), grads(false));
    // ds sums a million terms in another order: 1e-5 there.
    for (k, (what, tol)) in [
        ("loss", 1e-6),
        ("dimage", 1e-6),
        ("dtext", 1e-6),
        ("dscale", 1e-5),
    ]
    .iter()
    .enumerate()
    {
        assert_close(&format!("N{n} blocked vs whole {what}"), &b[k], &w[k], *tol);
    }
}

/// One rank's half of the local loss (rows against every column, labels
/// at an offset): its value against the CPU reference, and its gradients
/// for the rows, the columns and the scale against finite differences of
/// that reference.
#[test]
fn local_row_loss_matches_reference_and_finite_differences() {
    let Some(gpu) = gpu() else { return };
    let mut r = Rng::new(21);
    for &(rows, n, e, off, s) in &[
        (1, 1, 3, 0, 2.6592),
        (3, 7, 5, 4, 2.6592),
        (5, 9, 6, 2, 4.6052),
    ] {
        let s = s as f32 as f64;
        let a = unit_rows(&mut r, rows, e);
        let b = unit_rows(&mut r, n, e);
        let (denom, dy) = (2.0 * n as f64, 0.7);
        let mut tape = Tape::new();
        let av = tape.param(upload(&gpu, &a, &[rows, e]));
        let bv = tape.param(upload(&gpu, &b, &[n, e]));
        let sv = tape.param(upload(&gpu, &[s], &[1]));
        let loss = row_ce(&mut tape, &av, &bv, &sv, off, denom as f32).unwrap();
        let g = tape
            .backward_with(&loss, Tensor::from_slice(&gpu, &[dy as f32], &[1]).unwrap())
            .unwrap();
        let name = format!("local rows {rows} of N{n} at {off}");
        assert_close(
            &format!("{name} loss"),
            &download(loss.tensor()),
            &[row_ce_ref(&a, &b, s, e, off, denom)],
            2e-6,
        );
        let na = numeric_grad(&a, |x| dy * row_ce_ref(x, &b, s, e, off, denom));
        let nb = numeric_grad(&b, |x| dy * row_ce_ref(&a, x, s, e, off, denom));
        let ns = numeric_grad(&[s], |x| dy * row_ce_ref(&a, &b, x[0], e, off, denom));
        assert_close(
            &format!("{name} da"),
            &download(g.get(&av).unwrap()),
            &na,
            1e-4,
        );
        assert_close(
            &format!("{name} db"),
            &download(g.get(&bv).unwrap()),
            &nb,
            1e-4,
        );
        assert_close(
            &format!("{name} ds"),
            &download(g.get(&sv).unwrap()),
            &ns,
            1e-4,
        );
    }
}

/// OpenCLIP's local loss with gradients through the gather: ranks' local
/// losses (each its own rows against every column) sum to the contrastive
/// loss over all pairs, and each rank's rows' gradient (from its own rows,
/// plus what every rank's loss sends to those rows as columns) and the
/// scale's gradient summed over ranks are the whole loss's. Split 3 + 4, and
/// 1,100 + 1,101 rows (two blocks of rows each; the whole loss blocked).
#[test]
fn local_losses_over_ranks_are_the_whole_contrastive_loss() {
    let Some(gpu) = gpu() else { return };
    let mut r = Rng::new(22);
    for parts in [vec![3usize, 4], vec![1100, 1101]] {
        let (n, e, s) = (parts.iter().sum::<usize>(), 8, 2.6592f32 as f64);
        let (i, t) = (unit_rows(&mut r, n, e), unit_rows(&mut r, n, e));
        // The whole loss.
        let mut tape = Tape::new();
        let iv = tape.param(upload(&gpu, &i, &[n, e]));
        let tv = tape.param(upload(&gpu, &t, &[n, e]));
        let sv = tape.param(upload(&gpu, &[s], &[1]));
        let loss = contrastive_loss(&mut tape, &iv, &tv, &sv).unwrap();
        let g = tape.backward(&loss).unwrap();
        let want = [
            download(loss.tensor()),
            download(g.get(&iv).unwrap()),
            download(g.get(&tv).unwrap()),
            download(g.get(&sv).unwrap()),
        ];
        // The ranks'.
        let mut got = [vec![0.0], vec![0.0; n * e], vec![0.0; n * e], vec![0.0]];
        let mut off = 0;
        for &rows in &parts {
            let mut tape = Tape::new();
            let il = tape.param(upload(&gpu, &i[off * e..(off + rows) * e], &[rows, e]));
            let tl = tape.param(upload(&gpu, &t[off * e..(off + rows) * e], &[rows, e]));
            let ia = tape.param(upload(&gpu, &i, &[n, e]));
            let ta = tape.param(upload(&gpu, &t, &[n, e]));
            let sv = tape.param(upload(&gpu, &[s], &[1]));
            let denom = 2.0 * n as f32;
            let li = row_ce(&mut tape, &il, &ta, &sv, off, denom).unwrap();
            let lt = row_ce(&mut tape, &tl, &ia, &sv, off, denom).unwrap();
            got[0][0] += download(li.tensor())[0] + download(lt.tensor())[0];
            let one = || Tensor::scalar(&gpu, 1.0).unwrap();
            let g = tape
                .backward_seeded(vec![(&li, one()), (&lt, one())], Default::default())
                .unwrap();
            for (k, (own, all)) in [(1, (&il, &ia)), (2, (&tl, &ta))] {
                let (own, all) = (download(g.get(own).unwrap()), download(g.get(all).unwrap()));
                for (x, v) in got[k].iter_mut().zip(&all) {
                    *x += v;
                }
                for (x, v) in got[k][off * e..(off + rows) * e].iter_mut().zip(&own) {
                    *x += v;
                }
            }
            got[3][0] += download(g.get(&sv).unwrap())[0];
            off += rows;
        }
        for (k, what) in ["loss", "dimage", "dtext", "dscale"].iter().enumerate() {
            assert_close(
                &format!("N{n} local vs whole {what}"),
                &got[k],
                &want[k],
                1e-5,
            );
        }
    }
}

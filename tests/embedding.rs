mod common;
use clip_wgpu::ops::embedding::{
    class_pos, class_pos_backward_ref, class_pos_ref, embedding, embedding_backward_ref,
    embedding_ref,
};
use clip_wgpu::Tape;
use common::*;

/// GPU forward and table gradient for `n` ids into a [v, d] table.
fn run_embedding(
    table: &[f64],
    ids: &[u32],
    v: usize,
    d: usize,
    dy: &[f64],
) -> (Vec<f32>, Vec<f32>) {
    let gpu = gpu().unwrap();
    let mut tape = Tape::new();
    let t = tape.param(upload(&gpu, table, &[v, d]));
    let out = embedding(&mut tape, &t, ids, &[ids.len()]).unwrap();
    assert_eq!(out.shape(), &[ids.len(), d]);
    let g = tape
        .backward_with(&out, upload(&gpu, dy, &[ids.len(), d]))
        .unwrap();
    let dt = g.get(&t).unwrap();
    assert_eq!(dt.shape(), &[v, d]);
    (out.tensor().to_vec().unwrap(), dt.to_vec().unwrap())
}

#[test]
fn embedding_matches_reference() {
    if gpu().is_none() {
        return;
    }
    let mut r = Rng::new(1);
    for &(v, d, n) in &[
        (1, 1, 1),
        (7, 1, 50),
        (50, 77, 257),
        (257, 7, 77),
        (49, 33, 3),
    ] {
        let table = r.vec(v * d, 1.0);
        // Many repeats (small v) and ids that never occur (large v).
        let ids: Vec<u32> = (0..n).map(|_| r.below(v) as u32).collect();
        let dy = r.vec(n * d, 1.0);
        let (out, dt) = run_embedding(&table, &ids, v, d, &dy);
        let f64s = |x: &[f32]| x.iter().map(|&a| a as f64).collect::<Vec<_>>();
        assert_close(
            &format!("embedding V{v} D{d} N{n} forward"),
            &f64s(&out),
            &embedding_ref(&table, &ids, d),
            0.0,
        );
        let want = embedding_backward_ref(&dy, &ids, v, d);
        assert_close(
            &format!("embedding V{v} D{d} N{n} dtable"),
            &f64s(&dt),
            &want,
            1e-6 * (n as f64).sqrt(),
        );
        // Determinism: the scatter-add sums in a fixed order.
        let (out2, dt2) = run_embedding(&table, &ids, v, d, &dy);
        assert!(
            out == out2 && dt == dt2,
            "embedding V{v} D{d} N{n}: runs differ"
        );
    }
}

#[test]
fn embedding_rejects_out_of_range_id() {
    let Some(gpu) = gpu() else { return };
    let mut tape = Tape::new();
    let t = tape.param(upload(&gpu, &[0.0; 12], &[4, 3]));
    let e = embedding(&mut tape, &t, &[0, 3, 4, 1], &[2, 2]).unwrap_err();
    let msg = format!("{e:#}");
    assert!(msg.contains("id 4"), "{msg}");
    assert!(embedding(&mut tape, &t, &[0, 1], &[3]).is_err());
}

#[test]
fn embedding_pooled_tokens_from_hidden_states() {
    // Pooled-token selection: the table is [B, T, D] hidden states, ids b*T + pos.
    let Some(gpu) = gpu() else { return };
    let mut r = Rng::new(2);
    let (b, t, d) = (3, 7, 50);
    let h = r.vec(b * t * d, 1.0);
    let pos = [6usize, 0, 3];
    let ids: Vec<u32> = pos
        .iter()
        .enumerate()
        .map(|(bi, &p)| (bi * t + p) as u32)
        .collect();
    let mut tape = Tape::new();
    let hv = tape.param(upload(&gpu, &h, &[b, t, d]));
    let out = embedding(&mut tape, &hv, &ids, &[b]).unwrap();
    assert_eq!(out.shape(), &[b, d]);
    assert_close(
        "pooled forward",
        &download(out.tensor()),
        &embedding_ref(&h, &ids, d),
        0.0,
    );
    let dy = r.vec(b * d, 1.0);
    let g = tape
        .backward_with(&out, upload(&gpu, &dy, &[b, d]))
        .unwrap();
    let dh = g.get(&hv).unwrap();
    assert_eq!(dh.shape(), &[b, t, d]);
    assert_close(
        "pooled dhidden",
        &download(dh),
        &embedding_backward_ref(&dy, &ids, b * t, d),
        0.0,
    );
}

#[test]
fn embedding_reference_backward_matches_finite_differences() {
    let mut r = Rng::new(3);
    let (v, d) = (5, 3);
    let ids = [4u32, 0, 4, 2, 4, 0, 1];
    let table = r.vec(v * d, 1.0);
    let w = r.vec(ids.len() * d, 1.0);
    let want = numeric_grad(&table, |x| dot(&embedding_ref(x, &ids, d), &w));
    let got = embedding_backward_ref(&w, &ids, v, d);
    assert!(
        max_err(&got, &want) < 1e-6,
        "embedding ref backward vs fd: {:.3e}",
        max_err(&got, &want)
    );
}

fn run_class_pos(
    patches: &[f64],
    cls: &[f64],
    pos: &[f64],
    dy: &[f64],
    b: usize,
    np: usize,
    d: usize,
) -> [Vec<f32>; 4] {
    let gpu = gpu().unwrap();
    let mut tape = Tape::new();
    let pv = tape.param(upload(&gpu, patches, &[b, np, d]));
    let cv = tape.param(upload(&gpu, cls, &[d]));
    let posv = tape.param(upload(&gpu, pos, &[np + 1, d]));
    let out = class_pos(&mut tape, &pv, &cv, &posv).unwrap();
    assert_eq!(out.shape(), &[b, np + 1, d]);
    let g = tape
        .backward_with(&out, upload(&gpu, dy, &[b, np + 1, d]))
        .unwrap();
    assert_eq!(g.get(&pv).unwrap().shape(), &[b, np, d]);
    assert_eq!(g.get(&cv).unwrap().shape(), &[d]);
    assert_eq!(g.get(&posv).unwrap().shape(), &[np + 1, d]);
    [
        out.tensor().to_vec().unwrap(),
        g.get(&pv).unwrap().to_vec().unwrap(),
        g.get(&cv).unwrap().to_vec().unwrap(),
        g.get(&posv).unwrap().to_vec().unwrap(),
    ]
}

#[test]
fn class_pos_matches_reference() {
    if gpu().is_none() {
        return;
    }
    let mut r = Rng::new(4);
    // Batches up to 300 so the column sum takes its two-pass path too; d
    // a multiple of 4 takes the four-a-thread forward.
    for &(b, np, d) in &[
        (1, 1, 1),
        (3, 7, 50),
        (2, 49, 33),
        (300, 4, 7),
        (1, 50, 77),
        (2, 9, 12),
        (3, 16, 64),
    ] {
        let patches = r.vec(b * np * d, 1.0);
        let cls = r.vec(d, 1.0);
        let pos = r.vec((np + 1) * d, 1.0);
        let dy = r.vec(b * (np + 1) * d, 1.0);
        let got = run_class_pos(&patches, &cls, &pos, &dy, b, np, d);
        let f = |x: &[f32]| x.iter().map(|&a| a as f64).collect::<Vec<_>>();
        let name = format!("class_pos B{b} P{np} D{d}");
        assert_close(
            &format!("{name} forward"),
            &f(&got[0]),
            &class_pos_ref(&patches, &cls, &pos, b, np, d),
            1e-7,
        );
        let (dp, dc, dpos) = class_pos_backward_ref(&dy, b, np, d);
        let tol = 1e-6 * (b as f64).sqrt();
        assert_close(&format!("{name} dpatches"), &f(&got[1]), &dp, 0.0);
        assert_close(&format!("{name} dclass"), &f(&got[2]), &dc, tol);
        assert_close(&format!("{name} dpos"), &f(&got[3]), &dpos, tol);
        let again = run_class_pos(&patches, &cls, &pos, &dy, b, np, d);
        assert!(got == again, "{name}: runs differ");
    }
}

#[test]
fn class_pos_only_patches_need_grad() {
    // Frozen class/position embeddings: only dpatches is computed.
    let Some(gpu) = gpu() else { return };
    let mut r = Rng::new(6);
    let (b, np, d) = (2, 3, 5);
    let patches = r.vec(b * np * d, 1.0);
    let mut tape = Tape::new();
    let pv = tape.param(upload(&gpu, &patches, &[b, np, d]));
    let cv = tape.frozen(upload(&gpu, &r.vec(d, 1.0), &[d]));
    let posv = tape.frozen(upload(&gpu, &r.vec((np + 1) * d, 1.0), &[np + 1, d]));
    let out = class_pos(&mut tape, &pv, &cv, &posv).unwrap();
    let dy = r.vec(b * (np + 1) * d, 1.0);
    let g = tape
        .backward_with(&out, upload(&gpu, &dy, &[b, np + 1, d]))
        .unwrap();
    assert_eq!(g.len(), 1);
    assert_close(
        "class_pos frozen dpatches",
        &download(g.get(&pv).unwrap()),
        &class_pos_backward_ref(&dy, b, np, d).0,
        0.0,
    );
}

#[test]
fn class_pos_reference_backward_matches_finite_differences() {
    let mut r = Rng::new(5);
    let (b, np, d) = (2, 3, 4);
    let patches = r.vec(b * np * d, 1.0);
    let cls = r.vec(d, 1.0);
    let pos = r.vec((np + 1) * d, 1.0);
    let w = r.vec(b * (np + 1) * d, 1.0);
    let (dp, dc, dpos) = class_pos_backward_ref(&w, b, np, d);
    let np_ = numeric_grad(&patches, |x| {
        dot(&class_pos_ref(x, &cls, &pos, b, np, d), &w)
    });
    let nc = numeric_grad(&cls, |x| {
        dot(&class_pos_ref(&patches, x, &pos, b, np, d), &w)
    });
    let npos = numeric_grad(&pos, |x| {
        dot(&class_pos_ref(&patches, &cls, x, b, np, d), &w)
    });
    for (what, a, n) in [
        ("dpatches", &dp, &np_),
        ("dclass", &dc, &nc),
        ("dpos", &dpos, &npos),
    ] {
        let e = max_err(a, n);
        assert!(e < 1e-6, "class_pos ref {what} vs fd: {e:.3e}");
    }
}

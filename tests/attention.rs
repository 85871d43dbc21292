//! Multi-head attention (ops::attention) forward and backward against an f64
//! CPU reference, at sequence lengths that the CPU adapter pads to a multiple
//! of 4 (7, 13: padded keys masked, padded query rows dropped) and that it
//! does not (8), with causal and key-padding masks; the reference's own
//! gradient is central finite differences.
mod common;
use clip_wgpu::ops::attention::{attention, attention_unfused};
use clip_wgpu::ops::attention_fused::{attention_fused, Dims};
use clip_wgpu::ops::permute::swap12_pad;
use clip_wgpu::ops::softmax::Mask;
use clip_wgpu::Tape;
use common::*;

/// out[b, i, h*dh + e] = sum_j softmax_j(scale q_i . k_j | mask) v[j, e].
#[allow(clippy::too_many_arguments)]
fn attention_ref(
    q: &[f64],
    k: &[f64],
    v: &[f64],
    b: usize,
    t: usize,
    h: usize,
    dh: usize,
    causal: bool,
    valid: &[bool],
) -> Vec<f64> {
    let d = h * dh;
    let scale = (dh as f64).powf(-0.5);
    let mut out = vec![0.0; b * t * d];
    for bi in 0..b {
        for hi in 0..h {
            for i in 0..t {
                let at = |x: &[f64], j: usize, e: usize| x[(bi * t + j) * d + hi * dh + e];
                let keep = |j: usize| (!causal || j <= i) && valid[bi * t + j];
                let s: Vec<f64> = (0..t)
                    .map(|j| {
                        if keep(j) {
                            scale * (0..dh).map(|e| at(q, i, e) * at(k, j, e)).sum::<f64>()
                        } else {
                            f64::NEG_INFINITY
                        }
                    })
                    .collect();
                let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                if m == f64::NEG_INFINITY {
                    continue; // no visible key: the output row stays 0
                }
                let p: Vec<f64> = s.iter().map(|x| (x - m).exp()).collect();
                let z: f64 = p.iter().sum();
                for e in 0..dh {
                    out[(bi * t + i) * d + hi * dh + e] =
                        (0..t).map(|j| p[j] / z * at(v, j, e)).sum::<f64>();
                }
            }
        }
    }
    out
}

#[derive(Clone, Copy, Debug)]
enum Path {
    Default,
    Unfused,
    Fused,
    /// The fused kernels' subgroup version.
    FusedSubgroup,
    /// The tiled (GPU) kernels with this many rows a workgroup.
    Tiled(usize),
}

fn check(t: usize, h: usize, dh: usize, causal: bool, padded_keys: bool, path: Path) {
    let Some(gpu) = gpu() else { return };
    let b = 2;
    let d = h * dh;
    // Batch 1: the last 3 keys are padding, and with `padded_keys` and
    // t >= 9 its first 2 keys too (so under the causal mask its first
    // query rows see no key at all).
    let lens = [
        t,
        if padded_keys {
            t.saturating_sub(3).max(1)
        } else {
            t
        },
    ];
    let first = [0, if padded_keys && t >= 9 { 2 } else { 0 }];
    let mut rng = Rng::new(t as u64 * 31 + dh as u64);
    let (q, k, v) = (
        rng.vec(b * t * d, 1.0),
        rng.vec(b * t * d, 1.0),
        rng.vec(b * t * d, 1.0),
    );
    let w = rng.vec(b * t * d, 1.0);
    let shape = [b, t, d];
    let mut tape = Tape::new();
    let qv = tape.param(upload(&gpu, &q, &shape));
    let kv = tape.param(upload(&gpu, &k, &shape));
    let vv = tape.param(upload(&gpu, &v, &shape));
    let valid: Vec<bool> = (0..b * t)
        .map(|i| i % t < lens[i / t] && i % t >= first[i / t])
        .collect();
    let valid_f: Vec<f64> = valid.iter().map(|&v| v as u8 as f64).collect();
    let mask = Mask {
        causal,
        key_valid: padded_keys.then(|| upload(&gpu, &valid_f, &[b, t])),
        keys: None,
    };
    let out = match path {
        Path::Default => attention(&mut tape, &qv, &kv, &vv, h, &mask),
        Path::Unfused => attention_unfused(&mut tape, &qv, &kv, &vv, h, &mask),
        Path::Fused | Path::FusedSubgroup => {
            let sg = matches!(path, Path::FusedSubgroup);
            if sg && !gpu.subgroups_of_8() {
                return;
            }
            let d = Dims {
                b,
                t,
                h,
                dh,
                sg,
                tiled: None,
            };
            attention_fused(&mut tape, &qv, &kv, &vv, d, &mask)
        }
        Path::Tiled(rows) => {
            let d = Dims {
                b,
                t,
                h,
                dh,
                sg: false,
                tiled: Some(rows),
            };
            attention_fused(&mut tape, &qv, &kv, &vv, d, &mask)
        }
    }
    .unwrap();
    assert_eq!(out.shape(), &shape);
    let what =
        format!("attention {path:?} t={t} h={h} dh={dh} causal={causal} padding={padded_keys}");
    let want = attention_ref(&q, &k, &v, b, t, h, dh, causal, &valid);
    assert_close(
        &format!("{what} forward"),
        &download(out.tensor()),
        &want,
        2e-6,
    );
    // Gradients of L = sum(out * w).
    let mut grads = tape.backward_with(&out, upload(&gpu, &w, &shape)).unwrap();
    let loss = |q: &[f64], k: &[f64], v: &[f64]| {
        dot(&attention_ref(q, k, v, b, t, h, dh, causal, &valid), &w)
    };
    let dq = numeric_grad(&q, |x| loss(x, &k, &v));
    let dk = numeric_grad(&k, |x| loss(&q, x, &v));
    let dv = numeric_grad(&v, |x| loss(&q, &k, x));
    for (name, var, want) in [("dq", &qv, dq), ("dk", &kv, dk), ("dv", &vv, dv)] {
        let got = download(&grads.take(var).unwrap());
        assert_close(&format!("{what} {name}"), &got, &want, 2e-5);
    }
}

#[test]
fn attention_padded_to_multiple_of_four_matches_reference() {
    check(7, 2, 4, true, true, Path::Default);
    check(13, 2, 8, false, true, Path::Default);
    check(7, 2, 4, false, false, Path::Default);
    check(13, 2, 16, true, true, Path::Unfused);
    check(10, 2, 8, true, true, Path::Default);
}

/// The fused kernels (one per generated head size): causal and not, with
/// and without key padding, lengths not multiples of the rows a thread
/// takes, a single token, and a query row whose every key is masked. The
/// subgroup kernels take 3 rows a thread at lengths 1..13 and 37 (fewer
/// padded rows) and 4 at 29.
#[test]
fn fused_attention_matches_reference() {
    for path in [Path::Fused, Path::FusedSubgroup] {
        for dh in [16, 32, 64] {
            check(7, 2, dh, true, true, path);
            check(13, 2, dh, false, true, path);
            check(10, 1, dh, true, true, path);
            check(9, 1, dh, false, false, path);
            check(29, 1, dh, true, true, path);
        }
        check(1, 2, 16, true, false, path);
        // More row blocks than a subgroup's 8 (loop bounds of the subgroup).
        check(37, 1, 16, true, true, path);
    }
    check(5, 2, 32, true, false, Path::Default);
}

/// The tiled (GPU) kernels at every workgroup size this adapter fits: head
/// sizes from 4 to 128, sequences shorter than, equal to and longer than a
/// tile (one, two and several tiles, with a partial last chunk of keys),
/// causal and not, key padding, and query rows with no key.
#[test]
fn tiled_attention_matches_reference() {
    let Some(gpu) = gpu() else { return };
    let rows = clip_wgpu::ops::attention_fused::tiled_rows(&gpu, 64);
    assert!(!rows.is_empty(), "no tiled workgroup size fits");
    for &r in &rows {
        let path = Path::Tiled(r);
        // Long sequences at small head sizes: the reference's finite
        // differences cost t^2 * dh per element.
        check(7, 2, 16, true, true, path);
        check(r, 1, 8, false, true, path);
        check(r + 5, 1, 4, true, true, path);
        check(2 * r + 3, 1, 4, false, false, path);
        check(13, 2, 12, false, true, path);
    }
    check(9, 1, 64, true, true, Path::Tiled(rows[0]));
    // The largest head size, where the device fits it.
    if let Some(&r) = clip_wgpu::ops::attention_fused::tiled_rows(&gpu, 128).last() {
        check(5, 1, 128, false, true, Path::Tiled(r));
    }
}

#[test]
fn attention_unpadded_matches_reference() {
    check(8, 2, 4, true, true, Path::Default);
    check(7, 2, 5, true, true, Path::Default);
}

/// The padded axis swap under attention, on both kernels (inner axis a
/// multiple of 4: vec4 moves; else scalar), padding and cropping.
#[test]
fn swap12_pad_matches_reference() {
    let Some(gpu) = gpu() else { return };
    for (dims, x_out, y_out) in [
        ([2, 7, 3, 4], 8, 3),
        ([2, 7, 3, 3], 9, 3),
        ([2, 3, 8, 8], 3, 7),
        ([1, 5, 6, 1], 5, 6),
    ] {
        let [na, nx, ny, nz] = dims;
        let x: Vec<f64> = (0..na * nx * ny * nz).map(|i| i as f64 + 1.0).collect();
        let got = download(&swap12_pad(&upload(&gpu, &x, &[x.len()]), dims, x_out, y_out).unwrap());
        let mut want = vec![0.0; na * y_out * x_out * nz];
        for a in 0..na {
            for y in 0..y_out.min(ny) {
                for xi in 0..x_out.min(nx) {
                    for z in 0..nz {
                        want[((a * y_out + y) * x_out + xi) * nz + z] =
                            x[((a * nx + xi) * ny + y) * nz + z];
                    }
                }
            }
        }
        assert_eq!(got, want, "swap12_pad {dims:?} -> x {x_out}, y {y_out}");
    }
}

/// The batched transpose under the vec4 matmul's NT path: 4x4-block kernel
/// (both sizes multiples of 4) and the scalar one.
#[test]
fn transpose_matches_reference() {
    use clip_wgpu::ops::permute::transpose;
    let Some(gpu) = gpu() else { return };
    for (batch, rows, cols) in [(1, 4, 4), (3, 8, 12), (2, 128, 36), (2, 7, 12), (1, 5, 3)] {
        let x: Vec<f64> = (0..batch * rows * cols).map(|i| i as f64).collect();
        let got = download(&transpose(&upload(&gpu, &x, &[x.len()]), batch, rows, cols).unwrap());
        let mut want = vec![0.0; x.len()];
        for a in 0..batch {
            for r in 0..rows {
                for c in 0..cols {
                    want[(a * cols + c) * rows + r] = x[(a * rows + r) * cols + c];
                }
            }
        }
        assert_eq!(got, want, "transpose {batch}x{rows}x{cols}");
    }
}

//! The half-precision modes (`--fp16`, `--bf16`) op by op, against CPU
//! references that round where autocast rounds. Tolerances, by op:
//! - linear and MLP outputs: stored in the format, so within 2 of its units
//!   in the last place (f16 2^-10, bf16 2^-7 relative) of the output's
//!   scale: the GPU's f32 sum and the CPU's f64 sum can round to either
//!   neighbour at a tie-near value, and an MLP's intermediate may then
//!   differ by a unit, moving the output by about one more;
//! - their gradients: f32 arithmetic on the rounded operands (relative
//!   1e-5, MLP 1e-3 for the same intermediate-unit reason);
//! - attention: bitwise the f32 kernels' result on the same (16-bit) q, k,
//!   v, rounded; its gradients bitwise those of the f32 kernels (the
//!   backward recomputes with them).
mod common;
use clip_wgpu::ops::activation::{act_backward_ref, act_ref, Act};
use clip_wgpu::ops::attention::attention;
use clip_wgpu::ops::matmul::linear;
use clip_wgpu::ops::mlp::mlp;
use clip_wgpu::ops::softmax::Mask;
use clip_wgpu::precision::Precision;
use clip_wgpu::Tape;
use common::*;

const HALVES: [Precision; 2] = [Precision::F16, Precision::Bf16];

fn eps(fmt: Precision) -> f64 {
    match fmt {
        Precision::F16 => 2f64.powi(-10),
        _ => 2f64.powi(-7),
    }
}

fn rnd(x: &[f64], fmt: Precision) -> Vec<f64> {
    x.iter().map(|&v| fmt.round(v as f32) as f64).collect()
}

/// y = x W^T + b on the CPU, [rows, out].
fn lin(x: &[f64], w: &[f64], b: Option<&[f64]>, rows: usize, inp: usize, out: usize) -> Vec<f64> {
    let mut y = vec![0.0; rows * out];
    for i in 0..rows {
        for o in 0..out {
            let s: f64 = (0..inp).map(|k| x[i * inp + k] * w[o * inp + k]).sum();
            y[i * out + o] = s + b.map_or(0.0, |b| b[o]);
        }
    }
    y
}

/// (dx, dW, db) of y = x W^T + b.
fn lin_grads(
    dy: &[f64],
    x: &[f64],
    w: &[f64],
    rows: usize,
    inp: usize,
    out: usize,
) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let mut dx = vec![0.0; rows * inp];
    let mut dw = vec![0.0; out * inp];
    let mut db = vec![0.0; out];
    for i in 0..rows {
        for o in 0..out {
            let g = dy[i * out + o];
            db[o] += g;
            for k in 0..inp {
                dx[i * inp + k] += g * w[o * inp + k];
                dw[o * inp + k] += g * x[i * inp + k];
            }
        }
    }
    (dx, dw, db)
}

fn assert_units(what: &str, got: &[f64], want: &[f64], fmt: Precision, units: f64) {
    let scale = want.iter().fold(0.0f64, |m, v| m.max(v.abs()));
    assert_close(what, got, want, units * eps(fmt) * scale);
    // Stored values: each exactly representable.
    for &g in got {
        assert_eq!(
            fmt.round(g as f32) as f64,
            g,
            "{what}: {g} is not a {} value",
            fmt.name()
        );
    }
}

fn assert_rel(what: &str, got: &[f64], want: &[f64], tol: f64) {
    let scale = want.iter().fold(0.0f64, |m, v| m.max(v.abs()));
    assert_close(what, got, want, tol * scale);
}

#[test]
fn linear_rounds_where_autocast_does() {
    let Some(gpu) = gpu() else { return };
    let mut r = Rng::new(21);
    for (rows, inp, out) in [(7, 24, 20), (33, 64, 48), (5, 3, 7)] {
        let x = r.vec(rows * inp, 3.0);
        let (w, b) = (r.vec(out * inp, 0.5), r.vec(out, 0.5));
        let dy = r.vec(rows * out, 1.0);
        for fmt in HALVES {
            let what = format!("linear {rows}x{inp}->{out} {}", fmt.name());
            let mut tape = Tape::new().with_precision(fmt);
            let xv = tape.param(upload(&gpu, &x, &[rows, inp]));
            let wv = tape.param(upload(&gpu, &w, &[out, inp]));
            let bv = tape.param(upload(&gpu, &b, &[out]));
            let y = linear(&mut tape, &xv, &wv, Some(&bv)).unwrap();
            let (xr, wr, br) = (rnd(&x, fmt), rnd(&w, fmt), rnd(&b, fmt));
            let want = rnd(&lin(&xr, &wr, Some(&br), rows, inp, out), fmt);
            assert_units(
                &format!("{what}: y"),
                &download(y.tensor()),
                &want,
                fmt,
                2.0,
            );
            let mut g = tape
                .backward_with(&y, upload(&gpu, &dy, &[rows, out]))
                .unwrap();
            let (dx, dw, db) = lin_grads(&dy, &xr, &wr, rows, inp, out);
            assert_rel(
                &format!("{what}: dx"),
                &download(&g.take(&xv).unwrap()),
                &dx,
                1e-5,
            );
            assert_rel(
                &format!("{what}: dW"),
                &download(&g.take(&wv).unwrap()),
                &dw,
                1e-5,
            );
            assert_rel(
                &format!("{what}: db"),
                &download(&g.take(&bv).unwrap()),
                &db,
                1e-5,
            );
        }
    }
}

#[test]
fn mlp_rounds_each_linear_and_the_activation() {
    let Some(gpu) = gpu() else { return };
    let mut r = Rng::new(22);
    for (rows, d, f, a) in [(9, 16, 64, Act::QuickGelu), (6, 12, 20, Act::Gelu)] {
        let x = r.vec(rows * d, 2.0);
        let (w1, b1) = (r.vec(f * d, 0.5), r.vec(f, 0.5));
        let (w2, b2) = (r.vec(d * f, 0.5), r.vec(d, 0.5));
        let dy = r.vec(rows * d, 1.0);
        for fmt in HALVES {
            let what = format!("mlp {rows}x{d}x{f} {a:?} {}", fmt.name());
            let mut tape = Tape::new().with_precision(fmt);
            let xv = tape.param(upload(&gpu, &x, &[rows, d]));
            let w1v = tape.param(upload(&gpu, &w1, &[f, d]));
            let b1v = tape.param(upload(&gpu, &b1, &[f]));
            let w2v = tape.param(upload(&gpu, &w2, &[d, f]));
            let b2v = tape.param(upload(&gpu, &b2, &[d]));
            let y = mlp(&mut tape, &xv, (&w1v, Some(&b1v)), (&w2v, Some(&b2v)), a).unwrap();
            let xr = rnd(&x, fmt);
            let (w1r, b1r, w2r, b2r) = (rnd(&w1, fmt), rnd(&b1, fmt), rnd(&w2, fmt), rnd(&b2, fmt));
            let pre = rnd(&lin(&xr, &w1r, Some(&b1r), rows, d, f), fmt);
            let h = rnd(&act_ref(&pre, a), fmt);
            let want = rnd(&lin(&h, &w2r, Some(&b2r), rows, f, d), fmt);
            assert_units(
                &format!("{what}: y"),
                &download(y.tensor()),
                &want,
                fmt,
                4.0,
            );
            let mut g = tape
                .backward_with(&y, upload(&gpu, &dy, &[rows, d]))
                .unwrap();
            let (dh, dw2, db2) = lin_grads(&dy, &h, &w2r, rows, f, d);
            let dpre = act_backward_ref(&pre, &dh, a);
            let (dx, dw1, db1) = lin_grads(&dpre, &xr, &w1r, rows, d, f);
            for (name, v, want) in [
                ("dx", &xv, dx),
                ("dW1", &w1v, dw1),
                ("db1", &b1v, db1),
                ("dW2", &w2v, dw2),
                ("db2", &b2v, db2),
            ] {
                let got = download(&g.take(v).unwrap());
                assert_rel(&format!("{what}: {name}"), &got, &want, 1e-3);
            }
        }
    }
}

/// Attention in a half mode, each way it runs. The fused and tiled kernels
/// read the 16-bit copies of q, k and v: the output is the f32 output
/// rounded, bit for bit, and the backward, which reads the rounded output's
/// copy instead of recomputing it (as autocast keeps its half output), is
/// within a few units of the format of the f32 gradients. The unfused
/// pieces recompute the f32 forward in the backward: the f32 gradients
/// exactly.
#[test]
fn attention_reads_half_inputs() {
    use clip_wgpu::gpu::settings::Attention;
    let Some(gpu) = own_gpu() else { return };
    let mut r = Rng::new(23);
    let (b, t, heads, dh) = (2, 9, 2, 16);
    let n = b * t * heads * dh;
    for way in [Attention::Fused, Attention::Tiled, Attention::Unfused] {
        let mut settings = (*gpu.settings()).clone();
        settings.attention = Some(way);
        gpu.set_settings(settings);
        for causal in [false, true] {
            let mask = Mask {
                causal,
                ..Mask::default()
            };
            for fmt in HALVES {
                let what = format!("attention {way:?} causal {causal} {}", fmt.name());
                let qkv: Vec<Vec<f64>> = (0..3).map(|_| rnd(&r.vec(n, 1.0), fmt)).collect();
                let dy = r.vec(n, 1.0);
                let shape = [b, t, heads * dh];
                let run = |p: Precision| {
                    let mut tape = Tape::new().with_precision(p);
                    let v: Vec<_> = qkv
                        .iter()
                        .map(|x| tape.param(upload(&gpu, x, &shape)))
                        .collect();
                    let o = attention(&mut tape, &v[0], &v[1], &v[2], heads, &mask).unwrap();
                    let out = download(o.tensor());
                    let mut g = tape.backward_with(&o, upload(&gpu, &dy, &shape)).unwrap();
                    let grads: Vec<Vec<f64>> =
                        v.iter().map(|x| download(&g.take(x).unwrap())).collect();
                    (out, grads)
                };
                let (o32, g32) = run(Precision::F32);
                let (oh, gh) = run(fmt);
                assert_eq!(oh, rnd(&o32, fmt), "{what}: output");
                if way == Attention::Unfused {
                    assert_eq!(gh, g32, "{what}: gradients");
                    continue;
                }
                for (i, (got, want)) in gh.iter().zip(&g32).enumerate() {
                    assert_rel(
                        &format!("{what}: d{}", ["q", "k", "v"][i]),
                        got,
                        want,
                        4.0 * eps(fmt),
                    );
                }
            }
        }
    }
}

/// A whole tiny CLIP step: loss and every gradient near the f32 run's
/// (and unchanged by gradient checkpointing).
#[test]
fn tiny_model_step_tracks_f32() {
    let Some(gpu) = gpu() else { return };
    use clip_wgpu::model::clip::Batch;
    let mut m = init_model(&gpu, "clip", 3);
    let s = m.config.vision.image_size;
    let (n, len) = (6, 16);
    let mut r = Rng::new(24);
    let mut ids = vec![1u32; n * len];
    let mut mask = vec![0f32; n * len];
    for i in 0..n {
        let l = 4 + r.below(len - 4);
        caption(
            "clip",
            &mut ids[i * len..(i + 1) * len],
            &mut mask[i * len..(i + 1) * len],
            l,
            &mut r,
        );
    }
    let pixels = r.vec(n * 3 * s * s, 1.0);
    let run = |m: &clip_wgpu::model::clip::ClipModel| {
        let batch = Batch {
            pixels: upload(&gpu, &pixels, &[n, 3, s, s]),
            ids: ids.clone(),
            mask: mask.clone(),
            batch: n,
        };
        let mut tape = m.tape();
        let p = m.params.vars(&mut tape);
        let out = m.forward(&mut tape, &p, &batch).unwrap();
        let loss = download(out.loss.tensor())[0];
        let mut g = tape.backward(&out.loss).unwrap();
        let grads: Vec<Vec<f64>> =
            p.0.iter()
                .map(|v| g.take(v).map_or(Vec::new(), |t| download(&t)))
                .collect();
        (loss, grads)
    };
    let (l32, g32) = run(&m);
    // Gradient checkpointing recomputes each layer at the tape's precision:
    // the same loss and gradients, bit for bit.
    m.precision = Precision::Bf16;
    let plain = run(&m);
    m.set_gradient_checkpointing(true);
    let ckpt = run(&m);
    m.set_gradient_checkpointing(false);
    assert_eq!(plain.0, ckpt.0, "bf16 loss with gradient checkpointing");
    assert!(
        plain.1 == ckpt.1,
        "bf16 gradients with gradient checkpointing differ"
    );
    for (fmt, loss_tol, cos_min) in [(Precision::F16, 2e-3, 0.999), (Precision::Bf16, 1e-2, 0.99)] {
        m.precision = fmt;
        let (lh, gh) = run(&m);
        let rel = ((lh - l32) / l32).abs();
        eprintln!(
            "{}: loss {lh} vs f32 {l32} (relative {rel:.2e})",
            fmt.name()
        );
        assert!(rel <= loss_tol, "{}: loss {lh} vs f32 {l32}", fmt.name());
        let mut worst = 1.0f64;
        for ((p, a), b) in m.params.params.iter().zip(&gh).zip(&g32) {
            if b.is_empty() || p.name.ends_with("k_proj.bias") {
                continue; // k_proj.bias: the exact gradient is 0, both are noise
            }
            let cos = dot(a, b) / (dot(a, a).sqrt() * dot(b, b).sqrt()).max(1e-30);
            worst = worst.min(cos);
            assert!(
                cos >= cos_min,
                "{}: gradient of {} has cosine {cos} with f32's",
                fmt.name(),
                p.name
            );
        }
        eprintln!("{}: worst gradient cosine {worst:.5}", fmt.name());
    }
}

/// `--bf16` against PyTorch's autocast (CPU, bfloat16) on the same step:
/// tests/fixtures/autocast.py ran the clip_aligned fixture's forward and
/// backward under `torch.autocast` and in f32. PyTorch rounds at more places
/// than clip-wgpu (the activation's pieces, the logits, its flash
/// attention's probabilities), so the two differ by rounding of bf16's size:
/// tolerances are about 3x the largest difference measured on lavapipe, and
/// autocast's own distance from f32 is printed beside them.
#[test]
fn bf16_step_matches_torch_autocast() {
    use clip_wgpu::model::clip::{Batch, ClipModel};
    use clip_wgpu::model::weights::Weights;
    let Some(gpu) = gpu() else { return };
    let dir = fixtures().join("clip_aligned");
    let mut model = ClipModel::load(&gpu, &dir.join("model")).unwrap();
    model.precision = Precision::Bf16;
    let inputs = Weights::load_file(&dir.join("inputs.safetensors")).unwrap();
    let want = Weights::load_file(&dir.join("autocast_bf16.safetensors")).unwrap();
    let px = inputs.get("pixel_values").unwrap();
    let (ishape, ids) = &inputs.ints["input_ids"];
    let (_, mask) = &inputs.ints["attention_mask"];
    let batch = Batch {
        pixels: clip_wgpu::Tensor::from_slice(&gpu, &px.data, &px.shape).unwrap(),
        ids: ids.iter().map(|&v| v as u32).collect(),
        mask: mask.iter().map(|&v| v as f32).collect(),
        batch: ishape[0],
    };
    let mut tape = model.tape();
    let vars = model.params.vars(&mut tape);
    let out = model.forward(&mut tape, &vars, &batch).unwrap();
    let f = |v: &[f32]| v.iter().map(|&x| x as f64).collect::<Vec<f64>>();
    let loss = download(out.loss.tensor())[0];
    let (l16, l32) = (
        want.get("bf16.loss").unwrap().data[0] as f64,
        want.get("f32.loss").unwrap().data[0] as f64,
    );
    let rel = ((loss - l16) / l16).abs();
    eprintln!(
        "loss {loss} vs autocast {l16} (relative {rel:.2e}; autocast vs f32 {:.2e})",
        ((l16 - l32) / l32).abs()
    );
    assert!(rel <= 2e-3, "loss {loss} vs autocast bf16 {l16}");
    for e in ["image_embeds", "text_embeds"] {
        let got = download(if e == "image_embeds" {
            out.image_embeds.tensor()
        } else {
            out.text_embeds.tensor()
        });
        let w = f(&want.get(&format!("bf16.{e}")).unwrap().data);
        let err = max_err(&got, &w);
        eprintln!("{e}: max abs difference {err:.2e}");
        assert!(
            err <= 1.5e-2,
            "{e}: max abs difference {err:.2e} from autocast"
        );
    }
    let mut g = tape.backward(&out.loss).unwrap();
    let grads = model.params.grads(&vars, &mut g);
    let rel_norm = |a: &[f64], b: &[f64]| {
        let d: Vec<f64> = a.iter().zip(b).map(|(x, y)| x - y).collect();
        dot(&d, &d).sqrt() / dot(b, b).sqrt().max(1e-30)
    };
    let (mut worst, mut worst_ref) = ((0.0, String::new()), 0.0f64);
    for (p, gt) in model.params.params.iter().zip(&grads) {
        if p.name.ends_with("k_proj.bias") {
            continue; // the exact gradient is 0: both sides are noise
        }
        let got = download(gt.as_ref().unwrap());
        let w16 = f(&want.get(&format!("bf16.grad.{}", p.name)).unwrap().data);
        let w32 = f(&want.get(&format!("f32.grad.{}", p.name)).unwrap().data);
        let e = rel_norm(&got, &w16);
        worst_ref = worst_ref.max(rel_norm(&w16, &w32));
        if e > worst.0 {
            worst = (e, p.name.clone());
        }
        assert!(
            e <= 0.1,
            "gradient of {} off autocast's by {e:.2e} (relative norm)",
            p.name
        );
    }
    eprintln!(
        "gradients: largest relative-norm difference from autocast {:.2e} ({}); autocast vs f32 {worst_ref:.2e}",
        worst.0, worst.1
    );
}

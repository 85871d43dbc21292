//! The autograd tape on a small pre-LN transformer block feeding CLIP's
//! contrastive loss: every parameter gradient on the GPU against the f64 CPU
//! references chained by hand, plus determinism, frozen parameters, no-grad
//! mode and buffer release.
mod common;
use clip_wgpu::ops::activation::{act, act_backward_ref, act_ref, Act};
use clip_wgpu::ops::attention::attention;
use clip_wgpu::ops::elementwise::add_var;
use clip_wgpu::ops::embedding::embedding;
use clip_wgpu::ops::l2norm::{l2_normalize, l2_normalize_backward_ref, l2_normalize_ref};
use clip_wgpu::ops::layernorm::{layernorm, layernorm_backward_ref, layernorm_ref};
use clip_wgpu::ops::loss::{clip_loss, clip_loss_backward_ref, clip_loss_ref};
use clip_wgpu::ops::matmul::{gemm_backward_ref, gemm_ref, linear, Gemm};
use clip_wgpu::ops::permute::swap12_ref;
use clip_wgpu::ops::reduce::colsum_ref;
use clip_wgpu::ops::softmax::{softmax_backward_ref, softmax_ref, Mask};
use clip_wgpu::{Gpu, Tape, Tensor, Var};
use common::*;
use std::sync::Arc;

const B: usize = 3;
const T: usize = 7;
const D: usize = 10;
const H: usize = 2;
const DH: usize = D / H;
const F: usize = 13;
const E: usize = 6;
const EPS: f32 = 1e-5;
const LENS: [usize; B] = [7, 5, 3];

/// Parameter names and shapes, in a fixed order.
fn specs() -> Vec<(&'static str, Vec<usize>)> {
    vec![
        ("x", vec![B, T, D]),
        ("ln1.g", vec![D]),
        ("ln1.b", vec![D]),
        ("wq", vec![D, D]),
        ("bq", vec![D]),
        ("wk", vec![D, D]),
        ("bk", vec![D]),
        ("wv", vec![D, D]),
        ("bv", vec![D]),
        ("wo", vec![D, D]),
        ("bo", vec![D]),
        ("ln2.g", vec![D]),
        ("ln2.b", vec![D]),
        ("w1", vec![F, D]),
        ("c1", vec![F]),
        ("w2", vec![D, F]),
        ("c2", vec![D]),
        ("wp", vec![E, D]),
        ("txt", vec![B, E]),
        ("scale", vec![1]),
    ]
}

fn init() -> Vec<Vec<f64>> {
    let mut r = Rng::new(42);
    specs()
        .iter()
        .map(|(name, shape)| {
            let n: usize = shape.iter().product();
            match *name {
                "ln1.g" | "ln2.g" => (0..n).map(|_| 1.0 + 0.2 * r.uniform()).collect(),
                "scale" => vec![2.3],
                _ => r.vec(n, 0.5),
            }
        })
        .collect()
}

fn key_valid() -> Vec<f64> {
    (0..B * T)
        .map(|i| (i % T < LENS[i / T]) as u8 as f64)
        .collect()
}

/// Pooled row of each sequence: its last real token (as CLIP's eos).
fn pooled_rows() -> Vec<u32> {
    (0..B).map(|b| (b * T + LENS[b] - 1) as u32).collect()
}

/// The block on the GPU through the tape; returns (loss, param vars).
fn gpu_forward(
    gpu: &Arc<Gpu>,
    tape: &mut Tape,
    vals: &[Vec<f64>],
    frozen: &[&str],
) -> (Var, Vec<Var>) {
    let vars: Vec<Var> = specs()
        .iter()
        .zip(vals)
        .map(|((name, shape), v)| {
            let t = upload(gpu, v, shape);
            if frozen.contains(name) {
                tape.frozen(t)
            } else {
                tape.param(t)
            }
        })
        .collect();
    let p = |name: &str| &vars[specs().iter().position(|(n, _)| *n == name).unwrap()];
    let kv: Vec<f32> = key_valid().iter().map(|&v| v as f32).collect();
    let mask = Mask {
        causal: true,
        key_valid: Some(Tensor::from_slice(gpu, &kv, &[B, T]).unwrap()),
        keys: None,
    };
    let x = p("x").clone();
    let h = layernorm(tape, &x, p("ln1.g"), p("ln1.b"), EPS).unwrap();
    let q = linear(tape, &h, p("wq"), Some(p("bq"))).unwrap();
    let k = linear(tape, &h, p("wk"), Some(p("bk"))).unwrap();
    let v = linear(tape, &h, p("wv"), Some(p("bv"))).unwrap();
    let a = attention(tape, &q, &k, &v, H, &mask).unwrap();
    let o = linear(tape, &a, p("wo"), Some(p("bo"))).unwrap();
    let x1 = add_var(tape, &x, &o).unwrap();
    let h2 = layernorm(tape, &x1, p("ln2.g"), p("ln2.b"), EPS).unwrap();
    let f1 = linear(tape, &h2, p("w1"), Some(p("c1"))).unwrap();
    let f1a = act(tape, &f1, Act::QuickGelu).unwrap();
    let f2 = linear(tape, &f1a, p("w2"), Some(p("c2"))).unwrap();
    let x2 = add_var(tape, &x1, &f2).unwrap();
    let pooled = embedding(tape, &x2, &pooled_rows(), &[B]).unwrap();
    let e = linear(tape, &pooled, p("wp"), None).unwrap();
    let img = l2_normalize(tape, &e).unwrap();
    let txt = l2_normalize(tape, p("txt")).unwrap();
    let loss = clip_loss(tape, &img, &txt, p("scale")).unwrap().loss;
    (loss, vars)
}

fn lin(x: &[f64], w: &[f64], b: Option<&[f64]>, rows: usize, inp: usize, out: usize) -> Vec<f64> {
    gemm_ref(x, w, b, Gemm::new(1, rows, out, inp).tb(true))
}

/// (dx, dW, db) of a linear layer.
fn lin_back(
    dy: &[f64],
    x: &[f64],
    w: &[f64],
    rows: usize,
    inp: usize,
    out: usize,
) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let (dx, dw) = gemm_backward_ref(dy, x, w, Gemm::new(1, rows, out, inp).tb(true));
    (dx, dw, colsum_ref(dy, rows, out))
}

fn add(a: &[f64], b: &[f64]) -> Vec<f64> {
    a.iter().zip(b).map(|(x, y)| x + y).collect()
}

/// The same block in f64 on the CPU, forward then backward by hand.
/// Returns (loss, gradients in `specs()` order).
fn cpu_reference(vals: &[Vec<f64>]) -> (f64, Vec<Vec<f64>>) {
    let p = |name: &str| &vals[specs().iter().position(|(n, _)| *n == name).unwrap()][..];
    let eps = EPS as f64;
    let rows = B * T;
    let scale = (DH as f32).powf(-0.5);
    let x = p("x");
    let h1 = layernorm_ref(x, p("ln1.g"), p("ln1.b"), D, eps);
    let q = lin(&h1, p("wq"), Some(p("bq")), rows, D, D);
    let k = lin(&h1, p("wk"), Some(p("bk")), rows, D, D);
    let v = lin(&h1, p("wv"), Some(p("bv")), rows, D, D);
    let split = [B, T, H, DH];
    let merge = [B, H, T, DH];
    let (qh, kh, vh) = (
        swap12_ref(&q, split),
        swap12_ref(&k, split),
        swap12_ref(&v, split),
    );
    let gs = Gemm::new(B * H, T, T, DH).tb(true).alpha(scale);
    let s = gemm_ref(&qh, &kh, None, gs);
    let kv = key_valid();
    let pr = softmax_ref(&s, B, H, T, T, true, Some(&kv));
    let go = Gemm::new(B * H, T, DH, T);
    let oh = gemm_ref(&pr, &vh, None, go);
    let a = swap12_ref(&oh, merge);
    let o = lin(&a, p("wo"), Some(p("bo")), rows, D, D);
    let x1 = add(x, &o);
    let h2 = layernorm_ref(&x1, p("ln2.g"), p("ln2.b"), D, eps);
    let f1 = lin(&h2, p("w1"), Some(p("c1")), rows, D, F);
    let f1a = act_ref(&f1, Act::QuickGelu);
    let f2 = lin(&f1a, p("w2"), Some(p("c2")), rows, F, D);
    let x2 = add(&x1, &f2);
    let pr_rows = pooled_rows();
    let pooled: Vec<f64> = pr_rows
        .iter()
        .flat_map(|&r| x2[r as usize * D..(r as usize + 1) * D].to_vec())
        .collect();
    let e = lin(&pooled, p("wp"), None, B, D, E);
    let img = l2_normalize_ref(&e, E);
    let txt = l2_normalize_ref(p("txt"), E);
    let ls = p("scale")[0];
    let loss = clip_loss_ref(&img, &txt, ls, B, E);

    // Backward, in reverse.
    let (dimg, dtxt, dscale) = clip_loss_backward_ref(&img, &txt, ls, B, E, 1.0);
    let de = l2_normalize_backward_ref(&e, &dimg, E);
    let dtxt_in = l2_normalize_backward_ref(p("txt"), &dtxt, E);
    let (dpooled, dwp) = gemm_backward_ref(&de, &pooled, p("wp"), Gemm::new(1, B, E, D).tb(true));
    let mut dx2 = vec![0.0; rows * D];
    for (i, &r) in pr_rows.iter().enumerate() {
        for c in 0..D {
            dx2[r as usize * D + c] += dpooled[i * D + c];
        }
    }
    let (df1a, dw2, dc2) = lin_back(&dx2, &f1a, p("w2"), rows, F, D);
    let df1 = act_backward_ref(&f1, &df1a, Act::QuickGelu);
    let (dh2, dw1, dc1) = lin_back(&df1, &h2, p("w1"), rows, D, F);
    let (dx1_ln, dg2, db2) = layernorm_backward_ref(&dh2, &x1, p("ln2.g"), D, eps);
    let dx1 = add(&dx2, &dx1_ln);
    let (da, dwo, dbo) = lin_back(&dx1, &a, p("wo"), rows, D, D);
    let doh = swap12_ref(&da, split);
    let (dpr, dvh) = gemm_backward_ref(&doh, &pr, &vh, go);
    let ds = softmax_backward_ref(&pr, &dpr, B * H * T, T);
    let (dqh, dkh) = gemm_backward_ref(&ds, &qh, &kh, gs);
    let (dq, dk, dv) = (
        swap12_ref(&dqh, merge),
        swap12_ref(&dkh, merge),
        swap12_ref(&dvh, merge),
    );
    let (dh1q, dwq, dbq) = lin_back(&dq, &h1, p("wq"), rows, D, D);
    let (dh1k, dwk, dbk) = lin_back(&dk, &h1, p("wk"), rows, D, D);
    let (dh1v, dwv, dbv) = lin_back(&dv, &h1, p("wv"), rows, D, D);
    let dh1 = add(&add(&dh1q, &dh1k), &dh1v);
    let (dx_ln, dg1, db1) = layernorm_backward_ref(&dh1, x, p("ln1.g"), D, eps);
    let dx = add(&dx1, &dx_ln);
    let grads = vec![
        dx,
        dg1,
        db1,
        dwq,
        dbq,
        dwk,
        dbk,
        dwv,
        dbv,
        dwo,
        dbo,
        dg2,
        db2,
        dw1,
        dc1,
        dw2,
        dc2,
        dwp,
        dtxt_in,
        vec![dscale],
    ];
    (loss, grads)
}

/// ||g - r|| / ||r||; absolute for gradients that are zero in exact
/// arithmetic (the key bias: softmax is shift-invariant per query).
fn rel_norm_err(g: &[f64], r: &[f64]) -> f64 {
    let num: f64 = g
        .iter()
        .zip(r)
        .map(|(a, b)| (a - b).powi(2))
        .sum::<f64>()
        .sqrt();
    let den: f64 = r.iter().map(|b| b * b).sum::<f64>().sqrt();
    if den < 1e-9 {
        num
    } else {
        num / den
    }
}

#[test]
fn block_gradients_match_cpu_reference() {
    let Some(gpu) = gpu() else { return };
    let vals = init();
    let (loss_ref, grads_ref) = cpu_reference(&vals);
    let mut tape = Tape::new();
    let (loss, vars) = gpu_forward(&gpu, &mut tape, &vals, &[]);
    let l = download(loss.tensor())[0];
    eprintln!("loss gpu {l} cpu {loss_ref}");
    assert!(
        (l - loss_ref).abs() <= 1e-5 * loss_ref.abs().max(1.0),
        "loss {l} vs {loss_ref}"
    );
    let grads = tape.backward(&loss).unwrap();
    let mut worst: f64 = 0.0;
    for (((name, _), var), want) in specs().iter().zip(&vars).zip(&grads_ref) {
        let got = download(
            grads
                .get(var)
                .unwrap_or_else(|| panic!("no gradient for {name}")),
        );
        let e = rel_norm_err(&got, want);
        eprintln!("grad {name}: relative error {e:.2e}");
        worst = worst.max(e);
        assert!(e < 1e-4, "gradient of {name}: relative error {e:.2e}");
    }
    eprintln!("largest relative gradient error: {worst:.2e}");
}

#[test]
fn cpu_reference_block_matches_finite_differences() {
    // The hand-chained CPU backward itself, checked on a few coordinates of
    // every parameter.
    let vals = init();
    let (_, grads) = cpu_reference(&vals);
    let mut r = Rng::new(3);
    for (pi, (name, _)) in specs().iter().enumerate() {
        for _ in 0..3 {
            let i = r.below(vals[pi].len());
            let h = 1e-6;
            let mut vp = vals.clone();
            vp[pi][i] += h;
            let lp = cpu_reference(&vp).0;
            vp[pi][i] -= 2.0 * h;
            let lm = cpu_reference(&vp).0;
            let fd = (lp - lm) / (2.0 * h);
            let g = grads[pi][i];
            assert!(
                (fd - g).abs() <= 1e-6 * (1.0 + g.abs()),
                "{name}[{i}]: analytic {g} vs finite difference {fd}"
            );
        }
    }
}

#[test]
fn gradients_are_bitwise_deterministic() {
    let Some(gpu) = gpu() else { return };
    let vals = init();
    let run = || {
        let mut tape = Tape::new();
        let (loss, vars) = gpu_forward(&gpu, &mut tape, &vals, &[]);
        let grads = tape.backward(&loss).unwrap();
        vars.iter()
            .map(|v| grads.get(v).unwrap().to_vec().unwrap())
            .collect::<Vec<_>>()
    };
    assert!(run() == run(), "two runs gave different gradients");
}

#[test]
fn frozen_parameters_get_no_gradient_and_no_grad_records_nothing() {
    let Some(gpu) = gpu() else { return };
    let vals = init();
    let frozen = ["ln1.g", "wq", "bq", "w1"];
    let mut tape = Tape::new();
    let (loss, vars) = gpu_forward(&gpu, &mut tape, &vals, &frozen);
    let grads = tape.backward(&loss).unwrap();
    let (_, grads_ref) = cpu_reference(&vals);
    for (((name, _), var), want) in specs().iter().zip(&vars).zip(&grads_ref) {
        match grads.get(var) {
            None => assert!(frozen.contains(name), "{name} lost its gradient"),
            Some(g) => {
                assert!(
                    !frozen.contains(name),
                    "{name} is frozen but got a gradient"
                );
                assert!(rel_norm_err(&download(g), want) < 1e-4, "{name}");
            }
        }
    }
    let mut eval = Tape::no_grad();
    let (loss2, _) = gpu_forward(&gpu, &mut eval, &vals, &[]);
    assert!(
        eval.is_empty(),
        "no-grad mode recorded {} nodes",
        eval.len()
    );
    assert!(!loss2.requires_grad());
    let (a, b) = (download(loss.tensor())[0], download(loss2.tensor())[0]);
    assert_eq!(a, b, "no-grad forward differs");
}

#[test]
fn intermediates_return_to_the_pool() {
    let Some(gpu) = own_gpu() else { return };
    let vals = init();
    let held_before_step = |g: &Arc<Gpu>| {
        let s = g.pool_stats();
        s.held_bytes - s.free_bytes
    };
    let base = held_before_step(&gpu);
    let step = || {
        let mut tape = Tape::new();
        let (loss, vars) = gpu_forward(&gpu, &mut tape, &vals, &[]);
        let grads = tape.backward(&loss).unwrap();
        assert!(tape.is_empty());
        drop(vars);
        drop(grads);
        drop(loss);
    };
    step();
    let allocs = gpu.pool_stats().allocations;
    step();
    gpu.sync().unwrap();
    assert_eq!(
        held_before_step(&gpu),
        base,
        "buffers still held after the step"
    );
    assert_eq!(
        gpu.pool_stats().allocations,
        allocs,
        "second step allocated new buffers"
    );
}

//! Multi-head scaled dot-product attention from its pieces: head split,
//! scores = scale * Q K^T (batched over batch x heads), masked softmax,
//! P V, head merge. Each piece records its own backward on the tape.
//!
//! On CPU adapters the sequence is zero-padded to a multiple of 4 (padded
//! keys masked, padded query rows dropped at the merge) so every matmul here
//! takes the vec4 kernel: 77 text tokens ran at ~2 GFLOP/s unaligned.

use super::attention_fused::{self as fused, attention_fused, Dims};
use super::matmul::{chosen_variant, Variant};
use super::matmul::{matmul, Gemm};
use super::permute::{merge_heads_crop, reshape_var, split_heads_pad, swap12_pad};
use super::softmax::{masked_softmax, Mask};
use crate::gpu::settings::Attention;
use crate::gpu::{DeviceClass, Gpu};
use crate::tape::{Tape, Var};
use crate::tensor::Tensor;
use anyhow::{ensure, Result};

/// q, k, v: [B, T, H*Dh] (already projected). Returns [B, T, H*Dh].
pub fn attention(
    tape: &mut Tape,
    q: &Var,
    k: &Var,
    v: &Var,
    heads: usize,
    mask: &Mask,
) -> Result<Var> {
    let fused = fused_dims(q, k, v, heads, mask)?;
    let fmt = tape.precision();
    match fused {
        Some(d) if fmt.is_half() => fused::attention_fused_half(tape, [q, k, v], d, mask, fmt),
        Some(d) => run_fused(tape, q, k, v, d, mask),
        None if fmt.is_half() => attention_half(tape, q, k, v, heads, mask),
        None => attention_unfused(tape, q, k, v, heads, mask),
    }
}

/// The fused kernels `attention` runs with, or `None` for the unfused
/// pieces (sequence padding, or the choice of `choose_fused`).
fn fused_dims(q: &Var, k: &Var, v: &Var, heads: usize, mask: &Mask) -> Result<Option<Dims>> {
    let (b, t, dh) = dims(q, k, v, heads)?;
    let d = Dims {
        b,
        t,
        h: heads,
        dh,
        sg: q.tensor().gpu().subgroups_of_8(),
        tiled: None,
    };
    if mask.keys.is_some() {
        return Ok(None);
    }
    choose_fused(q, k, v, d, mask)
}

/// `attention` in a half mode where the fused kernels do not run
/// (sequence padding, a head size without them, or the tuner's choice): q,
/// k and v (the projections' rounded outputs) are kept as 16-bit copies,
/// and the backward runs the f32 attention again on them (inside, scores,
/// softmax and the weighted sum are f32, as flash attention under autocast
/// keeps them) and backpropagates through that; the output is rounded to the format. The
/// forward's intermediates (probabilities or log-sum-exps, the output) are
/// not held, for one more attention forward in the backward.
fn attention_half(
    tape: &mut Tape,
    q: &Var,
    k: &Var,
    v: &Var,
    heads: usize,
    mask: &Mask,
) -> Result<Var> {
    let fmt = tape.precision();
    let consts = [q, k, v].map(|x| Var::constant(x.tensor().clone()));
    let o = attention(
        &mut Tape::no_grad(),
        &consts[0],
        &consts[1],
        &consts[2],
        heads,
        mask,
    )?
    .into_tensor();
    super::convert::round_inplace(&o, fmt)?;
    drop(consts);
    let inputs = [q, k, v];
    if !tape.grad_enabled() || inputs.iter().all(|x| !x.requires_grad()) {
        return Ok(Var::constant(o));
    }
    let saved = inputs
        .iter()
        .map(|x| super::convert::save(x.tensor(), fmt))
        .collect::<Result<Vec<_>>>()?;
    let mask = mask.clone();
    Ok(tape.record(
        o,
        &inputs,
        Box::new(move |dy, needs| {
            let mut t = Tape::new();
            let vars = saved
                .iter()
                .zip(needs)
                .map(|(s, &need)| {
                    let x = s.get()?;
                    Ok(if need { t.param(x) } else { Var::constant(x) })
                })
                .collect::<Result<Vec<_>>>()?;
            let o = attention(&mut t, &vars[0], &vars[1], &vars[2], heads, &mask)?;
            let mut g = t.backward_with(&o, dy.clone())?;
            Ok(vars.iter().map(|x| g.take(x)).collect())
        }),
    ))
}

/// (batch, tokens, head size) of q, k, v [B, T, H*Dh], checked.
fn dims(q: &Var, k: &Var, v: &Var, heads: usize) -> Result<(usize, usize, usize)> {
    let s = q.shape();
    ensure!(
        s.len() == 3 && k.shape() == s && v.shape() == s,
        "attention: q {:?}, k {:?}, v {:?} must all be [B, T, D]",
        q.shape(),
        k.shape(),
        v.shape()
    );
    ensure!(
        heads > 0 && s[2].is_multiple_of(heads),
        "attention: width {} is not divisible by {heads} heads",
        s[2]
    );
    Ok((s[0], s[1], s[2] / heads))
}

/// The fused kernels attention runs with (`Dims` with `tiled` set or not),
/// or `None` for the unfused pieces. The settings' `attention`
/// (`CLIP_WGPU_ATTENTION=fused|tiled|unfused`) forces a choice where the
/// head size allows it. Otherwise the candidates are the fused kernels
/// where the head size has them and, on GPUs, the tiled kernels at each
/// workgroup size the device fits; the first time a shape runs each is
/// verified against the unfused path and the fastest (forward + backward,
/// unfused included) is kept with the matmul choices. With tuning off
/// (`CLIP_WGPU_TUNE=0`): the tiled kernels on GPUs, else fused.
fn choose_fused(q: &Var, k: &Var, v: &Var, d: Dims, mask: &Mask) -> Result<Option<Dims>> {
    let gpu = q.tensor().gpu();
    let settings = gpu.settings();
    let rows = Dims { tiled: None, ..d };
    let tiled: Vec<Dims> = if fused::tiled_supported(d.dh) {
        fused::tiled_rows(gpu, d.dh)
            .into_iter()
            .map(|r| Dims {
                tiled: Some(r),
                ..d
            })
            .collect()
    } else {
        Vec::new()
    };
    match settings.attention {
        Some(Attention::Unfused) => return Ok(None),
        Some(Attention::Fused) => return Ok(rows.supported().then_some(rows)),
        Some(Attention::Tiled) => return Ok(tiled.first().copied()),
        None => {}
    }
    let mut candidates: Vec<Dims> = Vec::new();
    if gpu.class == DeviceClass::Gpu {
        candidates.extend(&tiled);
    }
    if rows.supported() {
        candidates.push(rows);
    }
    if candidates.is_empty() {
        return Ok(None);
    }
    if !settings.tune {
        return Ok(Some(candidates[0]));
    }
    let key = format!(
        "attention {}x{}x{}x{}{}{}",
        d.b,
        d.t,
        d.h,
        d.dh,
        if mask.causal { " causal" } else { "" },
        if mask.key_valid.is_some() {
            " padded"
        } else {
            ""
        }
    );
    if let Some(v) = gpu.tuned(&key) {
        return Ok(candidates.iter().copied().find(|c| choice_name(c) == v));
    }
    let (qt, kt, vt) = (q.tensor(), k.tensor(), v.tensor());
    // Self-verification: each candidate's output and gradients on these
    // operands against the unfused path's (the reference: separate kernels,
    // each tested against the CPU). A disagreement rejects the candidate
    // for this shape, recorded and reported once.
    let want = outputs(qt, kt, vt, d, mask, false)?;
    let mut kept = Vec::new();
    for c in candidates {
        let name = choice_name(&c);
        let reject_key = format!("{key} rejected {name}");
        if gpu.tuned(&reject_key).is_some() {
            continue;
        }
        let got = outputs(qt, kt, vt, c, mask, true)?;
        let (err, scale) = crate::gpu::tune::max_difference(&got, &want);
        let tol = 1e-3 * scale + 1e-6;
        if err > tol {
            let why = format!(
                "max |difference| {err:.3e} from the unfused kernels (tolerance {tol:.1e}, largest value {scale:.3e})"
            );
            gpu.set_tuned(&reject_key, &why);
            crate::gpu::tune::report_rejection(&format!("{name} attention"), &key, &why);
            continue;
        }
        kept.push(c);
    }
    let mut best = (
        crate::gpu::tune::time(gpu, 3, || forward_backward(qt, kt, vt, d, mask, false))?,
        None,
    );
    for c in kept {
        let secs = crate::gpu::tune::time(gpu, 3, || forward_backward(qt, kt, vt, c, mask, true))?;
        if secs <= best.0 {
            best = (secs, Some(c));
        }
    }
    gpu.set_tuned(&key, &best.1.as_ref().map_or("unfused".into(), choice_name));
    Ok(best.1)
}

/// A fused choice's name in the tuning cache: "fused" or "tiled ROWS".
fn choice_name(d: &Dims) -> String {
    match d.tiled {
        Some(r) => format!("tiled {r}"),
        None => "fused".into(),
    }
}

/// `attention` from separate kernels (split, Q K^T, masked softmax, P V,
/// merge), whatever the head size.
pub fn attention_unfused(
    tape: &mut Tape,
    q: &Var,
    k: &Var,
    v: &Var,
    heads: usize,
    mask: &Mask,
) -> Result<Var> {
    let (b, t, dh) = dims(q, k, v, heads)?;
    let tp = padded_len(q.tensor().gpu(), b * heads, t, dh);
    let padded;
    let mask = if tp == t {
        mask
    } else {
        padded = pad_mask(mask, b, t, tp)?;
        &padded
    };
    let qh = split_heads_pad(tape, q, heads, tp)?;
    let kh = split_heads_pad(tape, k, heads, tp)?;
    let vh = split_heads_pad(tape, v, heads, tp)?;
    let scale = (dh as f32).powf(-0.5);
    let scores = matmul(
        tape,
        &qh,
        &kh,
        Gemm::new(b * heads, tp, tp, dh).tb(true).alpha(scale),
    )?;
    let t4 = scores.tensor().reshape(&[b, heads, tp, tp])?;
    let scores = reshape_var(tape, &scores, t4);
    let probs = masked_softmax(tape, &scores, mask)?;
    let out = matmul(tape, &probs, &vh, Gemm::new(b * heads, tp, dh, tp))?;
    let o4 = out.tensor().reshape(&[b, heads, tp, dh])?;
    let out = reshape_var(tape, &out, o4);
    merge_heads_crop(tape, &out, t)
}

/// One forward and backward of attention, fused or not, on a scratch tape
/// (the tuner, the bench).
pub fn forward_backward(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    d: Dims,
    mask: &Mask,
    fused: bool,
) -> Result<()> {
    let mut t = Tape::new();
    let (o, _, _) = pass(&mut t, q, k, v, d, mask, fused)?;
    let seed = o.tensor().clone();
    t.backward_with(&o, seed).map(drop)
}

/// One attention pass on tape `t` with q, k, v as its parameters: (output,
/// k, v).
fn pass(
    t: &mut Tape,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    d: Dims,
    mask: &Mask,
    fused: bool,
) -> Result<(Var, Var, Var)> {
    let (qv, kv, vv) = (t.param(q.clone()), t.param(k.clone()), t.param(v.clone()));
    let o = if fused {
        run_fused(t, &qv, &kv, &vv, d, mask)?
    } else {
        attention_unfused(t, &qv, &kv, &vv, d.h, mask)?
    };
    Ok((o, kv, vv))
}

/// The output and the key and value gradients (seeded with the output) of
/// one pass, read back: what the tuner's self-verification compares.
fn outputs(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    d: Dims,
    mask: &Mask,
    fused: bool,
) -> Result<Vec<f32>> {
    let mut t = Tape::new();
    let (o, kv, vv) = pass(&mut t, q, k, v, d, mask, fused)?;
    let mut out = o.tensor().to_vec()?;
    let seed = o.tensor().clone();
    let grads = t.backward_with(&o, seed)?;
    for g in [grads.get(&kv), grads.get(&vv)].into_iter().flatten() {
        out.extend(g.to_vec()?);
    }
    Ok(out)
}

/// `attention_fused`; with the test hook `Settings::broken_kernel` set to
/// "fused attention", a wrong version of it (the queries doubled).
fn run_fused(tape: &mut Tape, q: &Var, k: &Var, v: &Var, d: Dims, mask: &Mask) -> Result<Var> {
    let gpu = q.tensor().gpu();
    if gpu.settings().broken_kernel.as_deref() == Some("fused attention") {
        let doubled = Var::constant(crate::arith::add(q.tensor(), q.tensor())?);
        return attention_fused(tape, &doubled, k, v, d, mask);
    }
    attention_fused(tape, q, k, v, d, mask)
}

/// The sequence length attention runs at: T, or T rounded up to a multiple
/// of 4 where that turns the adapter's matmul from scalar to vec4 loads.
pub fn padded_len(gpu: &Gpu, bh: usize, t: usize, dh: usize) -> usize {
    let tp = t.next_multiple_of(4);
    let g = Gemm::new(bh, tp, tp, dh);
    let vec4 = |g: Gemm| chosen_variant(&g, gpu, g.m * g.k, g.k * g.n) == Variant::Vec4;
    if tp != t && vec4(g) && vec4(Gemm::new(bh, tp, dh, tp)) {
        tp
    } else {
        t
    }
}

/// The mask for keys padded from `t` to `tp`: the padding keys are masked.
fn pad_mask(mask: &Mask, b: usize, t: usize, tp: usize) -> Result<Mask> {
    let key_valid = match &mask.key_valid {
        Some(kv) => Some(swap12_pad(kv, [b, t, 1, 1], tp, 1)?.reshape(&[b, tp])?),
        None => None,
    };
    Ok(Mask {
        causal: mask.causal,
        key_valid,
        keys: Some(t),
    })
}

//! The transformer MLP, fc2(act(fc1(x))), as one tape op: the forward puts
//! the activation in fc1's matmul epilogue and the backward puts the
//! activation's derivative in the epilogue of the matmul that makes dH, so
//! neither direction runs a separate activation pass (with the vec4
//! kernels; other kernels fall back to the activation kernels).

use super::activation::Act;
use super::convert::{self, Saved};
use super::matmul::{gemm, gemm_act_into, linear_grads, Epilogue, Gemm};
use crate::precision::Precision;
use crate::tape::{Tape, Var};
use crate::tensor::Tensor;
use anyhow::{ensure, Result};

/// fc2(act(fc1(x))) for x [.., d], w1 [f, d], w2 [d2, f] (nn.Linear layout).
pub fn mlp(
    tape: &mut Tape,
    x: &Var,
    (w1, b1): (&Var, Option<&Var>),
    (w2, b2): (&Var, Option<&Var>),
    act: Act,
) -> Result<Var> {
    let xs = x.shape().to_vec();
    let (s1, s2) = (w1.shape().to_vec(), w2.shape().to_vec());
    ensure!(
        s1.len() == 2 && s2.len() == 2 && xs.last() == Some(&s1[1]) && s2[1] == s1[0],
        "mlp: input {xs:?}, fc1 {s1:?} and fc2 {s2:?} do not chain"
    );
    let (d, f, d2) = (s1[1], s1[0], s2[0]);
    let rows = x.tensor().numel() / d;
    let g1 = Gemm::new(1, rows, f, d).tb(true);
    let g2 = Gemm::new(1, rows, d2, f).tb(true);
    // In a half mode, as autocast runs it: each linear's operands and output
    // rounded to the format (the matmuls read x's, the activation's and the
    // weights' 16-bit copies, and round in their epilogue, so the activation
    // sees the rounded pre-activation as PyTorch's does), the activation's
    // output rounded too; the backward keeps the 16-bit copies of x, the
    // pre-activation and the activation. At f32 every copy is the tensor.
    let fmt = tape.precision();
    let round = |t: Option<&Var>| t.map(|t| convert::round_copy(t.tensor(), fmt)).transpose();
    let x_saved = convert::save(x.tensor(), fmt)?;
    let (w1c, b1r) = (convert::cast(w1.tensor(), fmt)?, round(b1)?);
    let gpu = x.tensor().gpu();
    let grad = tape.grad_enabled();
    let pre = Tensor::empty(gpu, &[rows, f])?;
    // With no backward the pre-activation is not kept: the activation
    // replaces it (one store a value, not two).
    let h = if grad {
        Tensor::empty(gpu, &[rows, f])?
    } else {
        pre.clone()
    };
    let epilogue = if grad {
        Epilogue::Act(act, &h)
    } else {
        Epilogue::ActInPlace(act)
    };
    gemm_act_into(
        &pre,
        &x_saved,
        &w1c,
        b1r.as_ref(),
        g1.round(fmt),
        Some(epilogue),
    )?;
    drop((w1c, b1r));
    let h_saved = convert::save(&h, fmt)?;
    drop(h);
    let (w2c, b2r) = (convert::cast(w2.tensor(), fmt)?, round(b2)?);
    let mut ys = xs.clone();
    *ys.last_mut().unwrap() = d2;
    let y = gemm(&h_saved, &w2c, b2r.as_ref(), g2.round(fmt))?.reshape(&ys)?;
    if !grad {
        return Ok(Var::constant(y));
    }
    let saved = Kept {
        x: x_saved,
        pre: convert::save(&pre, fmt)?,
        h: h_saved,
        fmt,
    };
    Ok(record_mlp(
        tape,
        y,
        x,
        (w1, b1),
        (w2, b2),
        act,
        (g1, g2),
        saved,
    ))
}

/// What the MLP's backward reads: x, the pre-activation and the
/// activation (16-bit copies in a half mode, where the weights are rounded
/// again from the f32 masters).
struct Kept {
    x: Saved,
    pre: Saved,
    h: Saved,
    fmt: Precision,
}

/// Record y = fc2(act(fc1(x))) (computed by the caller) with its backward.
#[allow(clippy::too_many_arguments)]
fn record_mlp(
    tape: &mut Tape,
    y: Tensor,
    x: &Var,
    (w1, b1): (&Var, Option<&Var>),
    (w2, b2): (&Var, Option<&Var>),
    act: Act,
    (g1, g2): (Gemm, Gemm),
    kept: Kept,
) -> Var {
    let (rows, f, d2) = (g1.m, g1.n, g2.n);
    let xs = x.shape().to_vec();
    // Inputs in order x, w1, [b1], w2, [b2]; where each gradient goes.
    let mut inputs = vec![x, w1];
    let i_b1 = b1.map(|b| {
        inputs.push(b);
        inputs.len() - 1
    });
    inputs.push(w2);
    let i_w2 = inputs.len() - 1;
    let i_b2 = b2.map(|b| {
        inputs.push(b);
        inputs.len() - 1
    });
    let (w1t, w2t) = (w1.tensor().clone(), w2.tensor().clone());
    tape.record_acc(
        y,
        &inputs,
        Box::new(move |dy, needs, acc| {
            let mut out: Vec<Option<Tensor>> = vec![None; needs.len()];
            let dy = dy.reshape(&[rows, d2])?;
            let w2 = convert::cast(&w2t, kept.fmt)?;
            let need_b2 = i_b2.is_some_and(|i| needs[i]);
            let (_, dw2, db2) =
                linear_grads(&dy, &kept.h, &w2, g2, false, needs[i_w2], need_b2, None)?;
            out[i_w2] = dw2;
            if let Some(i) = i_b2 {
                out[i] = db2;
            }
            let need_b1 = i_b1.is_some_and(|i| needs[i]);
            if needs[0] || needs[1] || need_b1 {
                // d(pre) = (dy W2) * act'(pre), in one matmul.
                let pre = kept.pre.get()?;
                let dpre = Tensor::empty(dy.gpu(), &[rows, f])?;
                gemm_act_into(
                    &dpre,
                    &dy,
                    &w2,
                    None,
                    Gemm::new(1, rows, f, d2),
                    Some(Epilogue::ActGrad(act, &pre)),
                )?;
                drop(pre);
                // W1 is read only for dx.
                let w1 = if needs[0] {
                    convert::cast(&w1t, kept.fmt)?
                } else {
                    Saved::Full(w1t.clone())
                };
                let dx_into = if needs[0] { acc[0].take() } else { None };
                let (dx, dw1, db1) = linear_grads(
                    &dpre, &kept.x, &w1, g1, needs[0], needs[1], need_b1, dx_into,
                )?;
                out[0] = dx.map(|t| t.reshape(&xs)).transpose()?;
                out[1] = dw1;
                if let Some(i) = i_b1 {
                    out[i] = db1;
                }
            }
            Ok(out)
        }),
    )
}

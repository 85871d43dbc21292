//! The transformer MLP, fc2(act(fc1(x))), as one tape op: the forward puts
//! the activation in fc1's matmul epilogue and the backward puts the
//! activation's derivative in the epilogue of the matmul that makes dH, so
//! neither direction runs a separate activation pass (with the vec4
//! kernels; other kernels fall back to the activation kernels).

use super::activation::Act;
use super::matmul::{gemm, gemm_act_into, linear_grads, Epilogue, Gemm};
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
    let gpu = x.tensor().gpu();
    let pre = Tensor::empty(gpu, &[rows, f])?;
    let h = Tensor::empty(gpu, &[rows, f])?;
    gemm_act_into(
        &pre,
        x.tensor(),
        w1.tensor(),
        b1.map(|b| b.tensor()),
        g1,
        Some(Epilogue::Act(act, &h)),
    )?;
    let mut ys = xs.clone();
    *ys.last_mut().unwrap() = d2;
    let y = gemm(&h, w2.tensor(), b2.map(|b| b.tensor()), g2)?.reshape(&ys)?;
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
    let (xt, w1t, w2t) = (x.tensor().clone(), w1.tensor().clone(), w2.tensor().clone());
    Ok(tape.record_acc(
        y,
        &inputs,
        Box::new(move |dy, needs, acc| {
            let mut out: Vec<Option<Tensor>> = vec![None; needs.len()];
            let dy = dy.reshape(&[rows, d2])?;
            let need_b2 = i_b2.is_some_and(|i| needs[i]);
            let (_, dw2, db2) = linear_grads(&dy, &h, &w2t, g2, false, needs[i_w2], need_b2, None)?;
            out[i_w2] = dw2;
            if let Some(i) = i_b2 {
                out[i] = db2;
            }
            let need_b1 = i_b1.is_some_and(|i| needs[i]);
            if needs[0] || needs[1] || need_b1 {
                // d(pre) = (dy W2) * act'(pre), in one matmul.
                let dpre = Tensor::empty(dy.gpu(), &[rows, f])?;
                let gh = Gemm::new(1, rows, f, d2);
                gemm_act_into(
                    &dpre,
                    &dy,
                    &w2t,
                    None,
                    gh,
                    Some(Epilogue::ActGrad(act, &pre)),
                )?;
                let dx_into = if needs[0] { acc[0].take() } else { None };
                let (dx, dw1, db1) =
                    linear_grads(&dpre, &xt, &w1t, g1, needs[0], needs[1], need_b1, dx_into)?;
                out[0] = dx.map(|t| t.reshape(&xs)).transpose()?;
                out[1] = dw1;
                if let Some(i) = i_b1 {
                    out[i] = db1;
                }
            }
            Ok(out)
        }),
    ))
}

//! Multi-head scaled dot-product attention from its pieces: head split,
//! scores = scale * Q K^T (batched over batch x heads), masked softmax,
//! P V, head merge. Each piece records its own backward on the tape.

use super::matmul::{matmul, Gemm};
use super::permute::{merge_heads, reshape_var, split_heads};
use super::softmax::{masked_softmax, Mask};
use crate::tape::{Tape, Var};
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
    let s = q.shape().to_vec();
    ensure!(
        s.len() == 3 && k.shape() == s.as_slice() && v.shape() == s.as_slice(),
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
    let (b, t, dh) = (s[0], s[1], s[2] / heads);
    let qh = split_heads(tape, q, heads)?;
    let kh = split_heads(tape, k, heads)?;
    let vh = split_heads(tape, v, heads)?;
    let scale = (dh as f32).powf(-0.5);
    let scores = matmul(
        tape,
        &qh,
        &kh,
        Gemm::new(b * heads, t, t, dh).tb(true).alpha(scale),
    )?;
    let t4 = scores.tensor().reshape(&[b, heads, t, t])?;
    let scores = reshape_var(tape, &scores, t4);
    let probs = masked_softmax(tape, &scores, mask)?;
    let out = matmul(tape, &probs, &vh, Gemm::new(b * heads, t, dh, t))?;
    let o4 = out.tensor().reshape(&[b, heads, t, dh])?;
    let out = reshape_var(tape, &out, o4);
    merge_heads(tape, &out)
}

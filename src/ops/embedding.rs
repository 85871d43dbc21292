//! Embedding lookups: a row gather (token embeddings, pooled-token selection)
//! whose backward is a deterministic scatter-add without atomics, and the
//! vision tower's class token + position embedding.

use super::{by_vec4, reduce, shader, u};
use crate::gpu::{Shader, Window};
use crate::tape::{Tape, Var};
use crate::tensor::Tensor;
use anyhow::{ensure, Result};
use std::sync::Arc;

const SHADER: Shader = shader!("embedding");
const CLASS_POS: Shader = shader!("class_pos");

/// Fail naming the first id that is not a row of a `rows`-row table.
pub fn check_ids(ids: &[u32], rows: usize) -> Result<()> {
    if let Some((n, &id)) = ids.iter().enumerate().find(|(_, &id)| id as usize >= rows) {
        anyhow::bail!(
            "embedding: id {id} (position {n}) is out of range for a table of {rows} rows"
        );
    }
    Ok(())
}

/// out[r, :] = table[ids[r], :] for `table` viewed [V, d] and `ids` a u32
/// tensor (ids are not range-checked here: see `check_ids`).
pub fn gather_rows(table: &Tensor, ids: &Tensor, d: usize) -> Result<Tensor> {
    ensure!(
        d > 0 && table.numel().is_multiple_of(d),
        "gather: table {:?} is not [V, {d}]",
        table.shape()
    );
    let n = ids.numel();
    let gpu = table.gpu();
    let out = Tensor::empty(gpu, &[n, d])?;
    for (row0, rows, window) in row_windows(table, d) {
        gpu.dispatch_windows(
            &SHADER,
            "gather",
            &[],
            &[u(n), u(d), 0, u(row0), u(rows), 0, 0, 0],
            &[
                Some(window),
                Some(Window::whole(ids.buffer())),
                Some(Window::whole(out.buffer())),
            ],
            gpu.grid_1d(n * d, 256),
        )?;
    }
    Ok(out)
}

/// The table [V, d] in windows of whole rows the adapter can bind: (first
/// row, rows, the bytes bound). One window holding everything when it fits.
fn row_windows(table: &Tensor, d: usize) -> Vec<(usize, usize, Window<'_>)> {
    let v = table.numel() / d;
    let per = (table.gpu().window_bytes(4 * d as u64) / (4 * d as u64)) as usize;
    if v <= per {
        return vec![(0, v, Window::whole(table.buffer()))];
    }
    (0..v)
        .step_by(per)
        .map(|r0| {
            let rows = per.min(v - r0);
            let w = Window {
                buffer: table.buffer(),
                offset: (r0 * d * 4) as u64,
                size: (rows * d * 4) as u64,
            };
            (r0, rows, w)
        })
        .collect()
}

/// Positions grouped by id on the host (CSR), uploaded as one u32 tensor
/// `[ids (uniq) | offsets (uniq + 1) | positions (n) | padding]` for
/// `scatter_rows`.
pub struct IdGroups {
    pub meta: Tensor,
    pub uniq: usize,
    pub n: usize,
}

pub fn group_ids(gpu: &Arc<crate::Gpu>, ids: &[u32]) -> Result<IdGroups> {
    let mut order: Vec<u32> = (0..u32::try_from(ids.len())?).collect();
    // Stable: the positions of one id stay in increasing order, which fixes
    // the summation order.
    order.sort_by_key(|&q| ids[q as usize]);
    let mut uniq = Vec::new();
    let mut offsets = Vec::new();
    for (j, &q) in order.iter().enumerate() {
        let id = ids[q as usize];
        if uniq.last() != Some(&id) {
            uniq.push(id);
            offsets.push(j as u32);
        }
    }
    offsets.push(order.len() as u32);
    let k = uniq.len();
    let mut meta = uniq;
    meta.extend_from_slice(&offsets);
    meta.extend_from_slice(&order);
    // Padded to its largest size (every id distinct), so that its buffer
    // size depends on n alone, not on how many ids a batch repeats: the
    // pool keeps one buffer per size it has seen.
    let len = 3 * ids.len() + 1;
    meta.resize(len, 0);
    Ok(IdGroups {
        meta: Tensor::from_u32(gpu, &meta, &[len])?,
        uniq: k,
        n: ids.len(),
    })
}

/// Table gradient [rows, d]: row id = sum of the dy rows at its positions,
/// zero for ids that do not occur. `dy` is [n, d].
pub fn scatter_rows(dy: &Tensor, groups: &IdGroups, rows: usize, d: usize) -> Result<Tensor> {
    ensure!(
        dy.numel() == groups.n * d,
        "embedding backward: dy {:?} is not [{}, {d}]",
        dy.shape(),
        groups.n
    );
    let gpu = dy.gpu();
    let out = Tensor::zeros(gpu, &[rows, d])?;
    for (row0, n_rows, window) in row_windows(&out, d) {
        gpu.dispatch_windows(
            &SHADER,
            "scatter_rows",
            &[],
            &[
                u(groups.n),
                u(d),
                u(groups.uniq),
                u(row0),
                u(n_rows),
                0,
                0,
                0,
            ],
            &[
                Some(Window::whole(dy.buffer())),
                Some(Window::whole(groups.meta.buffer())),
                Some(window),
            ],
            gpu.grid_1d(groups.uniq * d, 256),
        )?;
    }
    Ok(out)
}

/// Tape op: rows of `table` (any shape, last dim D, the rest its V rows)
/// picked by host `ids`; the output has shape `shape + [D]`. Serves token
/// embeddings and pooled-token selection (hidden states [B, T, D] with
/// ids b*T + pos). The table gradient has the table's shape.
pub fn embedding(tape: &mut Tape, table: &Var, ids: &[u32], shape: &[usize]) -> Result<Var> {
    let n: usize = shape.iter().product();
    ensure!(
        n == ids.len(),
        "embedding: shape {shape:?} holds {n} ids, got {}",
        ids.len()
    );
    ensure!(
        !table.shape().is_empty(),
        "embedding: table must have at least one dimension"
    );
    let d = table.tensor().cols();
    let rows = table.tensor().rows();
    check_ids(ids, rows)?;
    let gpu = table.tensor().gpu().clone();
    let idt = Tensor::from_u32(&gpu, ids, &[n])?;
    let mut oshape = shape.to_vec();
    oshape.push(d);
    let out = gather_rows(table.tensor(), &idt, d)?.reshape(&oshape)?;
    let ids = ids.to_vec();
    let tshape = table.shape().to_vec();
    Ok(tape.record(
        out,
        &[table],
        Box::new(move |dy, _| {
            let groups = group_ids(&gpu, &ids)?;
            Ok(vec![Some(
                scatter_rows(dy, &groups, rows, d)?.reshape(&tshape)?,
            )])
        }),
    ))
}

fn class_pos_dims(
    patches: &Tensor,
    class_emb: &Tensor,
    pos: &Tensor,
) -> Result<(usize, usize, usize)> {
    let s = patches.shape();
    ensure!(s.len() == 3, "class_pos: patches {s:?} are not [B, P, D]");
    let (b, np, d) = (s[0], s[1], s[2]);
    ensure!(
        class_emb.numel() == d,
        "class_pos: class embedding {:?} is not [{d}]",
        class_emb.shape()
    );
    ensure!(
        pos.numel() == (np + 1) * d,
        "class_pos: position embedding {:?} is not [{}, {d}]",
        pos.shape(),
        np + 1
    );
    Ok((b, np, d))
}

/// out [B, P+1, D]: out[b, 0] = class + pos[0], out[b, 1+q] = patches[b, q] + pos[1+q].
pub fn class_pos_forward(patches: &Tensor, class_emb: &Tensor, pos: &Tensor) -> Result<Tensor> {
    let (b, np, d) = class_pos_dims(patches, class_emb, pos)?;
    let gpu = patches.gpu();
    let out = Tensor::empty(gpu, &[b, np + 1, d])?;
    let (entry, per) = by_vec4(d.is_multiple_of(4), "class_pos");
    gpu.dispatch(
        &CLASS_POS,
        &entry,
        &[u(b), u(np), u(d), 0],
        &[
            Some(patches.buffer()),
            Some(class_emb.buffer()),
            Some(pos.buffer()),
            Some(out.buffer()),
        ],
        gpu.grid_1d(b * (np + 1) * d / per, 256),
    )?;
    Ok(out)
}

/// Gradients (dpatches [B, P, D], dclass [D], dpos [P+1, D]) from dout
/// [B, P+1, D], each only where `needs` asks: dpatches is a row gather,
/// dpos a deterministic column sum over the batch, dclass its first row.
pub fn class_pos_backward(
    dout: &Tensor,
    b: usize,
    np: usize,
    d: usize,
    needs: [bool; 3],
) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
    ensure!(
        dout.numel() == b * (np + 1) * d,
        "class_pos backward: dout {:?} is not [{b}, {}, {d}]",
        dout.shape(),
        np + 1
    );
    let gpu = dout.gpu();
    let dpatches = if needs[0] {
        let ids: Vec<u32> = (0..b)
            .flat_map(|bi| (0..np).map(move |q| (bi * (np + 1) + 1 + q) as u32))
            .collect();
        let idt = Tensor::from_u32(gpu, &ids, &[b * np])?;
        Some(gather_rows(dout, &idt, d)?.reshape(&[b, np, d])?)
    } else {
        None
    };
    let (mut dclass, mut dpos) = (None, None);
    if needs[1] || needs[2] {
        let dp = reduce::colsum(dout, b, (np + 1) * d)?.reshape(&[np + 1, d])?;
        if needs[1] {
            let dc = Tensor::empty(gpu, &[d])?;
            gpu.copy(dp.buffer(), dc.buffer(), (d * 4) as u64);
            dclass = Some(dc);
        }
        if needs[2] {
            dpos = Some(dp);
        }
    }
    Ok((dpatches, dclass, dpos))
}

/// Tape op: class token + position embedding for the vision tower.
/// patches [B, P, D], class_emb [D], pos [P+1, D] -> [B, P+1, D].
pub fn class_pos(tape: &mut Tape, patches: &Var, class_emb: &Var, pos: &Var) -> Result<Var> {
    let (b, np, d) = class_pos_dims(patches.tensor(), class_emb.tensor(), pos.tensor())?;
    let out = class_pos_forward(patches.tensor(), class_emb.tensor(), pos.tensor())?;
    let (cshape, pshape) = (class_emb.shape().to_vec(), pos.shape().to_vec());
    Ok(tape.record(
        out,
        &[patches, class_emb, pos],
        Box::new(move |dy, needs| {
            let (dp, dc, dpos) = class_pos_backward(dy, b, np, d, [needs[0], needs[1], needs[2]])?;
            Ok(vec![
                dp,
                dc.map(|t| t.reshape(&cshape)).transpose()?,
                dpos.map(|t| t.reshape(&pshape)).transpose()?,
            ])
        }),
    ))
}

/// CPU reference: rows of `table` ([V, d]) at `ids`.
pub fn embedding_ref(table: &[f64], ids: &[u32], d: usize) -> Vec<f64> {
    ids.iter()
        .flat_map(|&id| {
            table[id as usize * d..(id as usize + 1) * d]
                .iter()
                .copied()
        })
        .collect()
}

/// CPU reference of the table gradient [rows, d].
pub fn embedding_backward_ref(dy: &[f64], ids: &[u32], rows: usize, d: usize) -> Vec<f64> {
    let mut out = vec![0.0; rows * d];
    for (q, &id) in ids.iter().enumerate() {
        for c in 0..d {
            out[id as usize * d + c] += dy[q * d + c];
        }
    }
    out
}

pub fn class_pos_ref(
    patches: &[f64],
    class_emb: &[f64],
    pos: &[f64],
    b: usize,
    np: usize,
    d: usize,
) -> Vec<f64> {
    let mut out = vec![0.0; b * (np + 1) * d];
    for bi in 0..b {
        for t in 0..=np {
            for c in 0..d {
                let x = if t == 0 {
                    class_emb[c]
                } else {
                    patches[(bi * np + t - 1) * d + c]
                };
                out[(bi * (np + 1) + t) * d + c] = x + pos[t * d + c];
            }
        }
    }
    out
}

/// CPU reference: (dpatches, dclass, dpos).
pub fn class_pos_backward_ref(
    dout: &[f64],
    b: usize,
    np: usize,
    d: usize,
) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let mut dp = vec![0.0; b * np * d];
    let mut dc = vec![0.0; d];
    let mut dpos = vec![0.0; (np + 1) * d];
    for bi in 0..b {
        for t in 0..=np {
            for c in 0..d {
                let g = dout[(bi * (np + 1) + t) * d + c];
                dpos[t * d + c] += g;
                if t == 0 {
                    dc[c] += g;
                } else {
                    dp[(bi * np + t - 1) * d + c] = g;
                }
            }
        }
    }
    (dp, dc, dpos)
}

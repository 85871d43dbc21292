//! CLIP's patch embedding: Conv2d(C, D, kernel = stride = p, bias = False)
//! on pixels [B, C, H, W], output [B, P, D] with the P = (H/p)*(W/p) patches
//! in row-major order. Computed as im2col + gemm against the weight viewed
//! [D, C*p*p]; the backward is gemm (dW = dout^T cols, dcols = dout W) and
//! col2im for the pixels.

use super::matmul::{gemm, gemm_backward, Gemm};
use super::{by_vec4, shader, u};
use crate::gpu::Shader;
use crate::tape::{Tape, Var};
use crate::tensor::Tensor;
use anyhow::{ensure, Result};

const SHADER: Shader = shader!("patch");

/// Sizes of one patch embedding.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PatchDims {
    pub b: usize,
    pub c: usize,
    pub h: usize,
    pub w: usize,
    pub p: usize,
    pub d: usize,
}

impl PatchDims {
    /// Patches per column / row (trailing pixels that fill no patch are dropped).
    pub fn gh(&self) -> usize {
        self.h / self.p
    }
    pub fn gw(&self) -> usize {
        self.w / self.p
    }
    /// Patches per image.
    pub fn np(&self) -> usize {
        self.gh() * self.gw()
    }
    /// Values per patch, C*p*p.
    pub fn k(&self) -> usize {
        self.c * self.p * self.p
    }

    /// Check pixels [B, C, H, W] against weight [D, C, p, p].
    pub fn of(pixels: &[usize], weight: &[usize], patch: usize) -> Result<PatchDims> {
        ensure!(
            pixels.len() == 4,
            "patch_embed: pixels {pixels:?} are not [B, C, H, W]"
        );
        ensure!(
            weight.len() == 4 && weight[1] == pixels[1] && weight[2] == patch && weight[3] == patch,
            "patch_embed: weight {weight:?} is not [D, {}, {patch}, {patch}]",
            pixels[1]
        );
        let dims = PatchDims {
            b: pixels[0],
            c: pixels[1],
            h: pixels[2],
            w: pixels[3],
            p: patch,
            d: weight[0],
        };
        ensure!(
            patch > 0 && dims.gh() > 0 && dims.gw() > 0,
            "patch_embed: {}x{} image is smaller than the {patch}x{patch} patch",
            dims.h,
            dims.w
        );
        Ok(dims)
    }

    fn params(&self) -> [u32; 8] {
        [
            u(self.b),
            u(self.c),
            u(self.h),
            u(self.w),
            u(self.p),
            u(self.gh()),
            u(self.gw()),
            0,
        ]
    }

    fn gemm(&self) -> Gemm {
        Gemm::new(1, self.b * self.np(), self.d, self.k()).tb(true)
    }
}

/// pixels [B, C, H, W] -> cols [B*P, C*p*p].
pub fn im2col(pixels: &Tensor, dims: PatchDims) -> Result<Tensor> {
    ensure!(
        pixels.numel() == dims.b * dims.c * dims.h * dims.w,
        "im2col: pixels {:?} do not match {dims:?}",
        pixels.shape()
    );
    let gpu = pixels.gpu();
    let (entry, per) = by_vec4(
        dims.p.is_multiple_of(4) && dims.w.is_multiple_of(4),
        "im2col",
    );
    let n = dims.b * dims.np() * dims.k() / per;
    let cols = Tensor::empty(gpu, &[dims.b * dims.np(), dims.k()])?;
    gpu.dispatch(
        &SHADER,
        &entry,
        &dims.params(),
        &[Some(pixels.buffer()), Some(cols.buffer())],
        gpu.grid_1d(n, 256),
    )?;
    Ok(cols)
}

/// cols [B*P, C*p*p] -> pixels [B, C, H, W] (zeros where no patch reaches).
pub fn col2im(cols: &Tensor, dims: PatchDims) -> Result<Tensor> {
    ensure!(
        cols.numel() == dims.b * dims.np() * dims.k(),
        "col2im: cols {:?} do not match {dims:?}",
        cols.shape()
    );
    let gpu = cols.gpu();
    let n = dims.b * dims.c * dims.h * dims.w;
    let px = Tensor::empty(gpu, &[dims.b, dims.c, dims.h, dims.w])?;
    gpu.dispatch(
        &SHADER,
        "col2im",
        &dims.params(),
        &[Some(cols.buffer()), Some(px.buffer())],
        gpu.grid_1d(n, 256),
    )?;
    Ok(px)
}

/// Forward: (out [B, P, D], cols) — the cols are what the weight gradient needs.
pub fn patch_embed_forward(
    pixels: &Tensor,
    weight: &Tensor,
    dims: PatchDims,
) -> Result<(Tensor, Tensor)> {
    let cols = im2col(pixels, dims)?;
    let out = gemm(&cols, weight, None, dims.gemm())?.reshape(&[dims.b, dims.np(), dims.d])?;
    Ok((out, cols))
}

/// Backward: (dpixels, dweight) where `need_*` asks for them.
pub fn patch_embed_backward(
    dout: &Tensor,
    cols: &Tensor,
    weight: &Tensor,
    dims: PatchDims,
    need_pixels: bool,
    need_weight: bool,
) -> Result<(Option<Tensor>, Option<Tensor>)> {
    let (dcols, dw) = gemm_backward(dout, cols, weight, dims.gemm(), need_pixels, need_weight)?;
    let dpx = dcols.map(|dc| col2im(&dc, dims)).transpose()?;
    Ok((dpx, dw))
}

/// Tape op: pixels [B, C, H, W], weight [D, C, p, p] -> [B, P, D].
pub fn patch_embed(tape: &mut Tape, pixels: &Var, weight: &Var, patch: usize) -> Result<Var> {
    let dims = PatchDims::of(pixels.shape(), weight.shape(), patch)?;
    let (out, cols) = patch_embed_forward(pixels.tensor(), weight.tensor(), dims)?;
    let w = weight.tensor().clone();
    Ok(tape.record(
        out,
        &[pixels, weight],
        Box::new(move |dy, needs| {
            let (dpx, dw) = patch_embed_backward(dy, &cols, &w, dims, needs[0], needs[1])?;
            Ok(vec![dpx, dw])
        }),
    ))
}

/// CPU reference: the strided convolution itself (not im2col), [B, P, D].
pub fn patch_embed_ref(pixels: &[f64], weight: &[f64], dims: PatchDims) -> Vec<f64> {
    let PatchDims { b, c, h, w, p, d } = dims;
    let (gw, np) = (dims.gw(), dims.np());
    let mut out = vec![0.0; b * np * d];
    for bi in 0..b {
        for q in 0..np {
            let (py, px) = (q / gw, q % gw);
            for o in 0..d {
                let mut s = 0.0;
                for ch in 0..c {
                    for kh in 0..p {
                        for kw in 0..p {
                            let x = pixels[((bi * c + ch) * h + py * p + kh) * w + px * p + kw];
                            s += x * weight[((o * c + ch) * p + kh) * p + kw];
                        }
                    }
                }
                out[(bi * np + q) * d + o] = s;
            }
        }
    }
    out
}

/// CPU reference: (dpixels [B, C, H, W], dweight [D, C, p, p]).
pub fn patch_embed_backward_ref(
    dout: &[f64],
    pixels: &[f64],
    weight: &[f64],
    dims: PatchDims,
) -> (Vec<f64>, Vec<f64>) {
    let PatchDims { b, c, h, w, p, d } = dims;
    let (gw, np) = (dims.gw(), dims.np());
    let mut dpx = vec![0.0; pixels.len()];
    let mut dw = vec![0.0; weight.len()];
    for bi in 0..b {
        for q in 0..np {
            let (py, px) = (q / gw, q % gw);
            for o in 0..d {
                let g = dout[(bi * np + q) * d + o];
                for ch in 0..c {
                    for kh in 0..p {
                        for kw in 0..p {
                            let xi = ((bi * c + ch) * h + py * p + kh) * w + px * p + kw;
                            let wi = ((o * c + ch) * p + kh) * p + kw;
                            dpx[xi] += g * weight[wi];
                            dw[wi] += g * pixels[xi];
                        }
                    }
                }
            }
        }
    }
    (dpx, dw)
}

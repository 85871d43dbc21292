//! f32 <-> 16-bit storage for the half-precision modes (`--fp16`, `--bf16`):
//! activations that the backward needs are kept as packed f16 or bf16 words
//! (half the memory), and the values the forward computes with are rounded
//! to the format where PyTorch's autocast rounds them, so the backward sees
//! exactly the values the forward used. Arithmetic stays f32.
//!
//! Kernels in shaders/convert.wgsl; the host reference is
//! `crate::precision` (the `half` crate's rounding, bit for bit).

use super::{shader, u};
use crate::gpu::{Shader, Window};
use crate::precision::Precision;
use crate::tensor::Tensor;
use anyhow::{ensure, Result};

const SHADER: Shader = shader!("convert");

/// A tensor stored as 16-bit values, two a u32 word.
#[derive(Clone, Debug)]
pub struct Half {
    words: Tensor,
    shape: Vec<usize>,
    fmt: Precision,
}

impl Half {
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
    pub fn precision(&self) -> Precision {
        self.fmt
    }
    /// The packed words ([(numel + 1) / 2] u32).
    pub fn words(&self) -> &Tensor {
        &self.words
    }
    /// The values as an f32 tensor.
    pub fn unpack(&self) -> Result<Tensor> {
        let x = Tensor::empty(self.words.gpu(), &self.shape)?;
        run("unpack_words", &x, Some(&self.words), self.fmt)?;
        Ok(x)
    }
    /// The 16-bit patterns on the host (for tests).
    pub fn to_bits(&self) -> Result<Vec<u16>> {
        let words: Vec<u32> = bytemuck::cast_slice(&self.words.to_vec()?).to_vec();
        let mut out: Vec<u16> = words
            .iter()
            .flat_map(|w| [(*w & 0xffff) as u16, (*w >> 16) as u16])
            .collect();
        out.truncate(self.numel());
        Ok(out)
    }
}

/// The override constant that picks `fmt`'s decoding and rounding in
/// convert.wgsl and the kernels that share its block (FMT 1: bf16, else
/// f16).
pub(crate) fn fmt_constant(fmt: Precision) -> (&'static str, f64) {
    ("FMT", (fmt == Precision::Bf16) as u32 as f64)
}

fn check_fmt(fmt: Precision) -> Result<()> {
    ensure!(fmt.is_half(), "16-bit conversion asked for precision f32");
    Ok(())
}

fn run(entry: &str, x: &Tensor, w: Option<&Tensor>, fmt: Precision) -> Result<()> {
    let gpu = x.gpu();
    let n = x.numel();
    // A tensor larger than one binding goes in windows whose starts are
    // multiples of the offset alignment in both the f32 and the 16-bit
    // buffer (an even element count, so no word is split).
    let align = (gpu.limits.min_storage_buffer_offset_alignment as usize).max(4);
    for (e0, len) in gpu.elem_windows(n, align) {
        let mut buffers = vec![Some(Window::elems(x.buffer(), e0, len, n))];
        buffers.extend(w.map(|w| {
            Some(if len == n {
                Window::whole(w.buffer())
            } else {
                Window {
                    buffer: w.buffer(),
                    offset: (e0 * 2) as u64,
                    size: (len.div_ceil(2) * 4) as u64,
                }
            })
        }));
        gpu.dispatch_windows(
            &SHADER,
            entry,
            &[fmt_constant(fmt)],
            &[u(len), 0, 0, 0],
            &buffers,
            gpu.grid_1d(len.div_ceil(2), 256),
        )?;
    }
    Ok(())
}

fn words_for(x: &Tensor) -> Result<Tensor> {
    Tensor::empty(x.gpu(), &[x.numel().div_ceil(2).max(1)])
}

/// The 16-bit copy of `x` (rounded to nearest even).
pub fn pack(x: &Tensor, fmt: Precision) -> Result<Half> {
    check_fmt(fmt)?;
    let words = words_for(x)?;
    run("pack_words", x, Some(&words), fmt)?;
    Ok(Half {
        words,
        shape: x.shape().to_vec(),
        fmt,
    })
}

/// Round `x` in place to the values `fmt` holds.
pub fn round_inplace(x: &Tensor, fmt: Precision) -> Result<()> {
    if fmt.is_half() {
        run("round_values", x, None, fmt)?;
    }
    Ok(())
}

/// A rounded copy of `x` (`x` itself at f32).
pub fn round_copy(x: &Tensor, fmt: Precision) -> Result<Tensor> {
    if !fmt.is_half() {
        return Ok(x.clone());
    }
    let y = Tensor::empty(x.gpu(), x.shape())?;
    x.gpu().copy(x.buffer(), y.buffer(), (x.numel() * 4) as u64);
    round_inplace(&y, fmt)?;
    Ok(y)
}

/// Round `x` in place and return its packed copy, in one pass.
pub fn round_pack(x: &Tensor, fmt: Precision) -> Result<Half> {
    check_fmt(fmt)?;
    let words = words_for(x)?;
    run("round_pack", x, Some(&words), fmt)?;
    Ok(Half {
        words,
        shape: x.shape().to_vec(),
        fmt,
    })
}

/// What an op keeps for its backward: the tensor itself at f32, its 16-bit
/// copy in the half modes.
#[derive(Clone, Debug)]
pub enum Saved {
    Full(Tensor),
    Half(Half),
}

impl Saved {
    /// The saved values as an f32 tensor (a fresh one from a 16-bit copy).
    pub fn get(&self) -> Result<Tensor> {
        Operand::from(self).to_f32()
    }
}

/// Keep `x` for the backward at precision `fmt`. In a half mode the copy is
/// made once per buffer: the q, k and v projections of one layer-normed
/// input share it. `x` should hold values `fmt` represents (an op's rounded
/// output): otherwise the backward sees them rounded.
pub fn save(x: &Tensor, fmt: Precision) -> Result<Saved> {
    if !fmt.is_half() {
        return Ok(Saved::Full(x.clone()));
    }
    let memo = x.packed_memo();
    let words = match memo.get() {
        Some((f, w)) if *f == fmt => w.clone(),
        _ => {
            let h = pack(x, fmt)?;
            let _ = memo.set((fmt, h.words.clone()));
            h.words
        }
    };
    Ok(Saved::Half(Half {
        words,
        shape: x.shape().to_vec(),
        fmt,
    }))
}

/// `w` as a matmul reads it at precision `fmt`, as autocast casts a
/// weight: itself at f32, else its 16-bit copy (made anew each time: the
/// f32 master weights change every step).
pub fn cast(w: &Tensor, fmt: Precision) -> Result<Saved> {
    Ok(if fmt.is_half() {
        Saved::Half(pack(w, fmt)?)
    } else {
        Saved::Full(w.clone())
    })
}

/// A kernel's input: f32 values, or 16-bit ones packed two a u32 word (the
/// half-precision modes' kept activations and weight copies), which the
/// matmul (vec4, subgroup, blocked, cooperative-matrix) and fused attention
/// kernels read as they are; other kernels get an f32 copy first.
#[derive(Clone, Copy, Debug)]
pub enum Operand<'a> {
    F32(&'a Tensor),
    Half(&'a Half),
}

impl<'a> From<&'a Tensor> for Operand<'a> {
    fn from(t: &'a Tensor) -> Self {
        Operand::F32(t)
    }
}

impl<'a> From<&'a Half> for Operand<'a> {
    fn from(h: &'a Half) -> Self {
        Operand::Half(h)
    }
}

impl<'a> From<&'a Saved> for Operand<'a> {
    fn from(s: &'a Saved) -> Self {
        match s {
            Saved::Full(t) => Operand::F32(t),
            Saved::Half(h) => Operand::Half(h),
        }
    }
}

impl Operand<'_> {
    pub fn shape(&self) -> &[usize] {
        match self {
            Operand::F32(t) => t.shape(),
            Operand::Half(h) => h.shape(),
        }
    }
    pub fn numel(&self) -> usize {
        match self {
            Operand::F32(t) => t.numel(),
            Operand::Half(h) => h.numel(),
        }
    }
    pub(crate) fn tensor(&self) -> &Tensor {
        match self {
            Operand::F32(t) => t,
            Operand::Half(h) => h.words(),
        }
    }
    pub fn gpu(&self) -> &std::sync::Arc<crate::gpu::Gpu> {
        self.tensor().gpu()
    }
    /// The 16-bit format of a packed operand.
    pub fn half(&self) -> Option<Precision> {
        match self {
            Operand::F32(_) => None,
            Operand::Half(h) => Some(h.precision()),
        }
    }
    /// The values as f32 (a fresh tensor for a packed operand).
    pub fn to_f32(self) -> Result<Tensor> {
        match self {
            Operand::F32(t) => Ok(t.clone()),
            Operand::Half(h) => h.unpack(),
        }
    }
}

/// CPU reference of the round trip.
pub fn round_ref(x: &[f32], fmt: Precision) -> Vec<f32> {
    x.iter().map(|&v| fmt.round(v)).collect()
}

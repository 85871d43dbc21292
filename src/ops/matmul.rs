//! Batched matmul with transpose flags and optional bias, and the linear
//! layer built on it. Backward reuses the same kernel with other flags; the
//! bias gradient is a column sum.

use super::activation::Act;
use super::convert;
pub use super::convert::Operand;
use super::{f, reduce, shader, u};
use crate::gpu::{DeviceClass, Gpu, Shader};
use crate::precision::Precision;
use crate::tape::{Tape, Var};
use crate::tensor::Tensor;
use anyhow::{ensure, Result};

const SHADER: Shader = shader!("matmul");
// The generated kernels by operand layout (`Layout as usize`).
const SHADER_VEC4: [Shader; 3] = [
    shader!("matmul_vec4"),
    shader!("matmul_vec4_b16"),
    shader!("matmul_vec4_ab16"),
];
const SHADER_SG: [Shader; 3] = [
    shader!("matmul_sg"),
    shader!("matmul_sg_b16"),
    shader!("matmul_sg_ab16"),
];
const SHADER_BLOCKED: [Shader; 3] = [
    shader!("matmul_blocked"),
    shader!("matmul_blocked_b16"),
    shader!("matmul_blocked_ab16"),
];
const SHADER_COOP8: [Shader; 2] = [shader!("matmul_coop8"), shader!("matmul_coop8_ab16")];
const SHADER_COOP16: [Shader; 2] = [shader!("matmul_coop16"), shader!("matmul_coop16_ab16")];

/// Which operands a kernel reads packed: the generated shaders' variants.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Layout {
    F32 = 0,
    B16 = 1,
    Ab16 = 2,
}

pub use crate::gpu::settings::{Block, Tile, Variant};

/// One matmul kernel with its shape parameters: what the tuner chooses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kernel {
    Regs,
    Tiled,
    Vec4(Tile),
    Blocked(Block),
    /// Cooperative matrices of this size (8 or 16).
    Coop(u32),
}

impl Kernel {
    /// Its name in the tuning cache, profiles and messages, e.g. "vec4 16x2"
    /// or "blocked 64x64x16/4x4".
    pub fn name(self) -> String {
        match self {
            Kernel::Regs => "regs".into(),
            Kernel::Tiled => "tiled".into(),
            Kernel::Vec4(t) => format!("vec4 {t}"),
            Kernel::Blocked(b) => format!("blocked {b}"),
            Kernel::Coop(s) => format!("coop {s}x{s}"),
        }
    }

    pub fn variant(self) -> Variant {
        match self {
            Kernel::Regs => Variant::Regs,
            Kernel::Tiled => Variant::Tiled,
            Kernel::Vec4(_) => Variant::Vec4,
            Kernel::Blocked(_) => Variant::Blocked,
            Kernel::Coop(_) => Variant::Coop,
        }
    }

    /// Whether the kernel binds the epilogue constants and the aux tensor.
    fn has_epilogue(self) -> bool {
        matches!(self, Kernel::Vec4(_) | Kernel::Blocked(_) | Kernel::Coop(_))
    }

    /// Whether it runs epilogue `e` in its own pass (else separate kernels
    /// do it afterwards).
    fn runs(self, e: Epilogue) -> bool {
        match self {
            Kernel::Coop(_) => !matches!(e, Epilogue::BiasGrad(_)),
            k => k.has_epilogue(),
        }
    }
}

/// C[b] = alpha * op(A[b]) op(B[b]) (+ bias) (+ C[b]). op(A) is [m, k], op(B)
/// is [k, n]; `ta`/`tb` say the operand is stored transposed. An operand
/// holding a single matrix is shared by every batch entry (weights).
#[derive(Clone, Copy, Debug)]
pub struct Gemm {
    pub batch: usize,
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub ta: bool,
    pub tb: bool,
    pub alpha: f32,
    pub accumulate: bool,
    /// Force a kernel variant (tests, bench); `None` picks per adapter.
    pub variant: Option<Variant>,
    /// Force a matmul_vec4 tile (tests, tuner); `None` picks per adapter.
    pub tile: Option<Tile>,
    /// Force a matmul_blocked block (tests, tuner); `None` picks per adapter.
    pub block: Option<Block>,
    /// Round C (and an activation epilogue's output) to this 16-bit
    /// format, as autocast rounds a half-precision matmul's output.
    pub round: Option<Precision>,
}

impl Gemm {
    pub fn new(batch: usize, m: usize, n: usize, k: usize) -> Gemm {
        Gemm {
            batch,
            m,
            n,
            k,
            ta: false,
            tb: false,
            alpha: 1.0,
            accumulate: false,
            variant: None,
            tile: None,
            block: None,
            round: None,
        }
    }
    pub fn ta(mut self, t: bool) -> Gemm {
        self.ta = t;
        self
    }
    pub fn tb(mut self, t: bool) -> Gemm {
        self.tb = t;
        self
    }
    pub fn alpha(mut self, a: f32) -> Gemm {
        self.alpha = a;
        self
    }
    pub fn variant(mut self, v: Variant) -> Gemm {
        self.variant = Some(v);
        self
    }
    pub fn tile(mut self, t: Tile) -> Gemm {
        self.tile = Some(t);
        self
    }
    pub fn block(mut self, b: Block) -> Gemm {
        self.block = Some(b);
        self
    }
    pub fn round(mut self, fmt: Precision) -> Gemm {
        self.round = fmt.is_half().then_some(fmt);
        self
    }
    /// `self` forced to run `k`.
    pub fn kernel(self, k: Kernel) -> Gemm {
        let g = self.variant(k.variant());
        match k {
            Kernel::Vec4(t) => g.tile(t),
            Kernel::Blocked(b) => g.block(b),
            Kernel::Regs | Kernel::Tiled | Kernel::Coop(_) => g,
        }
    }
    pub fn flops(&self) -> f64 {
        2.0 * (self.batch * self.m * self.n * self.k) as f64
    }
}

/// Batch stride of an operand: 0 when one matrix serves every batch entry.
fn batch_stride(t: Operand, per: usize, batch: usize, what: &str) -> Result<usize> {
    if t.numel() == per * batch {
        Ok(per)
    } else if t.numel() == per {
        Ok(0)
    } else {
        anyhow::bail!(
            "matmul: {what} has shape {:?}, expected {batch} x {per} or {per} elements",
            t.shape()
        )
    }
}

/// Run `g` into an existing output (which it overwrites or, with
/// `accumulate`, adds to).
pub fn gemm_into<'o>(
    c: &Tensor,
    a: impl Into<Operand<'o>>,
    b: impl Into<Operand<'o>>,
    bias: Option<&Tensor>,
    g: Gemm,
) -> Result<()> {
    gemm_act_into(c, a, b, bias, g, None)
}

/// What a matmul does after computing C (see `gemm_act_into`).
#[derive(Clone, Copy)]
pub enum Epilogue<'a> {
    /// Also write act(C) into the tensor.
    Act(Act, &'a Tensor),
    /// C = act(C): `Act` where nothing keeps the activation's input.
    ActInPlace(Act),
    /// C *= act'(x) with x (the activation's input) in the tensor.
    ActGrad(Act, &'a Tensor),
    /// Also write out[i] = sum_k op(A)[i, k] (A stored transposed, one
    /// batch entry, alpha 1): with A = dY of a linear layer, its bias
    /// gradient, from the loads the weight gradient makes anyway.
    BiasGrad(&'a Tensor),
}

impl<'a> Epilogue<'a> {
    /// The aux tensor the vec4 kernels bind (none: C), and their ACT /
    /// ACT_KIND / BIAS_GRAD override values.
    fn parts(self) -> (Option<&'a Tensor>, u32, u32, bool) {
        match self {
            Epilogue::Act(a, t) => (Some(t), 1, a.code(), false),
            Epilogue::ActInPlace(a) => (None, 3, a.code(), false),
            Epilogue::ActGrad(a, t) => (Some(t), 2, a.code(), false),
            Epilogue::BiasGrad(t) => (Some(t), 0, 0, true),
        }
    }
}

/// `gemm_into` with an epilogue: in the same pass with the vec4 kernels,
/// else by separate kernels afterwards.
pub fn gemm_act_into<'o>(
    c: &Tensor,
    a: impl Into<Operand<'o>>,
    b: impl Into<Operand<'o>>,
    bias: Option<&Tensor>,
    g: Gemm,
    act: Option<Epilogue>,
) -> Result<()> {
    let (a, b) = (a.into(), b.into());
    match act {
        Some(Epilogue::BiasGrad(out)) => ensure!(
            out.numel() == g.m && g.ta && g.batch == 1 && !g.accumulate && g.alpha == 1.0,
            "matmul: a bias-gradient epilogue needs [{}] values, A transposed, one batch entry, no accumulation and alpha 1",
            g.m
        ),
        Some(e) => {
            let t = e.parts().0.unwrap_or(c);
            ensure!(
                t.numel() == c.numel(),
                "matmul: activation output {:?} does not match {:?}",
                t.shape(),
                c.shape()
            )
        }
        None => {}
    }
    let a_bs = batch_stride(a, g.m * g.k, g.batch, "A")?;
    let b_bs = batch_stride(b, g.k * g.n, g.batch, "B")?;
    ensure!(
        c.numel() == g.batch * g.m * g.n,
        "matmul: output {:?} is not {} x {} x {}",
        c.shape(),
        g.batch,
        g.m,
        g.n
    );
    if let Some(bias) = bias {
        ensure!(
            bias.numel() == g.n,
            "matmul: bias {:?} is not [{}]",
            bias.shape(),
            g.n
        );
    }
    if g.m == 0 || g.n == 0 || g.batch == 0 {
        return Ok(());
    }
    let gpu = a.gpu();
    if g.k == 0 {
        // Empty sum: C = bias (or unchanged when accumulating).
        if !g.accumulate {
            gpu.clear(c.buffer());
        }
        ensure!(bias.is_none(), "matmul: k = 0 with a bias is not supported");
        return Ok(());
    }
    let lda = if g.ta { g.m } else { g.k };
    let ldb = if g.tb { g.k } else { g.n };
    let params = [
        u(g.m),
        u(g.n),
        u(g.k),
        u(lda),
        u(ldb),
        u(g.n),
        u(a_bs),
        u(b_bs),
        u(g.m * g.n),
        bias.is_some() as u32,
        g.accumulate as u32,
        f(g.alpha),
    ];
    let layout = match (a.half(), b.half()) {
        (None, None) => Layout::F32,
        (None, Some(_)) => Layout::B16,
        (Some(fa), Some(fb)) if fa == fb => Layout::Ab16,
        // No kernel reads only A packed (or two formats): A as f32.
        _ => return gemm_act_into(c, &a.to_f32()?, b, bias, g, act),
    };
    let fmt = b.half().or(g.round);
    ensure!(
        g.round.is_none() || b.half().is_none() || g.round == b.half(),
        "matmul: operands in {} rounded to {}",
        b.half().map_or("f32", |f| f.name()),
        g.round.map_or("f32", |f| f.name())
    );
    let kernel = choose(&g, a, b, c, a_bs, b_bs)?;
    let packed_ok = match kernel {
        Kernel::Vec4(_) | Kernel::Blocked(_) => true,
        // Its products are f16: exact for f32 operands holding f16 values
        // and for packed f16 ones, not for packed bf16.
        Kernel::Coop(_) => layout == Layout::F32 || a.half() == Some(Precision::F16),
        Kernel::Regs | Kernel::Tiled => layout == Layout::F32,
    };
    if !packed_ok {
        let (af, bf) = (a.to_f32()?, b.to_f32()?);
        return gemm_act_into(c, &af, &bf, bias, g.kernel(kernel), act);
    }
    let mut params = params;
    if gpu.settings().broken_kernel.as_deref() == Some(kernel.name().as_str()) {
        // Test hook (Settings::broken_kernel): this kernel computes wrong
        // results.
        params[11] = f(g.alpha * 1.5);
    }
    if matches!(kernel, Kernel::Vec4(_))
        && g.tb
        && (g.ta || !g.k.is_multiple_of(4) || b_bs % 4 != 0)
    {
        // The vec4 kernels read a transposed B as vec4s along k (TRANS_B);
        // where they cannot, B is transposed first (one pass over it) so its
        // rows are vec4s along n.
        let bt =
            super::permute::transpose(&b.to_f32()?, if b_bs == 0 { 1 } else { g.batch }, g.n, g.k)?;
        let g = Gemm { tb: false, ..g }.kernel(kernel);
        return gemm_act_into(c, a, &bt, bias, g, act);
    }
    if let Some(e) = act.filter(|e| !kernel.runs(*e)) {
        gemm_act_into(c, a, b, bias, g.kernel(kernel), None)?;
        return match e {
            Epilogue::Act(kind, out) => {
                super::activation::forward_into(c, out, kind)?;
                g.round.map_or(Ok(()), |f| convert::round_inplace(out, f))
            }
            Epilogue::ActInPlace(kind) => {
                // Not in place: a dispatch may not bind C as both its input
                // and its output.
                let h = super::activation::forward(c, kind)?;
                gpu.copy(h.buffer(), c.buffer(), (c.numel() * 4) as u64);
                g.round.map_or(Ok(()), |f| convert::round_inplace(c, f))
            }
            Epilogue::ActGrad(kind, x) => {
                // Not in place: a dispatch may not bind C as both its input
                // and its output.
                let d = super::activation::backward(x, c, kind)?;
                gpu.copy(d.buffer(), c.buffer(), (c.numel() * 4) as u64);
                Ok(())
            }
            // A stored [k, m]: its column sums.
            Epilogue::BiasGrad(out) => reduce::colsum_into(&a.to_f32()?, g.k, g.m, out, false),
        };
    }
    let entry;
    let (shader, entry, tile_m, tile_n) = match kernel {
        Kernel::Regs => (&SHADER, "matmul_regs", 32, 32),
        Kernel::Vec4(t) => {
            // 8x8 threads of rm rows x 4*rv columns (build/matmul_gen.rs).
            let sh = if t.sg { &SHADER_SG } else { &SHADER_VEC4 };
            let sh = &sh[layout as usize];
            let prefix = if t.sg { "matmul_sg" } else { "matmul_vec4" };
            entry = format!("{prefix}_{}x{}", t.rm, t.rv);
            (sh, entry.as_str(), 8 * t.rm, 32 * t.rv)
        }
        Kernel::Tiled => (&SHADER, "matmul_tiled", 64, 64),
        Kernel::Blocked(b) => (
            &SHADER_BLOCKED[layout as usize],
            "matmul_blocked",
            b.bm,
            b.bn,
        ),
        Kernel::Coop(s) => {
            let sh = if s == 16 {
                &SHADER_COOP16
            } else {
                &SHADER_COOP8
            };
            let sh = &sh[(layout == Layout::Ab16) as usize];
            (sh, "matmul_coop", 2 * s as usize, 2 * s as usize)
        }
    };
    let mut constants = vec![
        ("TRANS_A", g.ta as u32 as f64),
        ("TRANS_B", g.tb as u32 as f64),
    ];
    if kernel.has_epilogue() {
        // Specialized epilogues (see matmul_vec4.tmpl.wgsl).
        constants.extend([
            ("HAS_BIAS", bias.is_some() as u32 as f64),
            ("ACCUMULATE", g.accumulate as u32 as f64),
            ("ACT", act.map_or(0, |e| e.parts().1) as f64),
            ("ACT_KIND", act.map_or(0, |e| e.parts().2) as f64),
            ("BIAS_GRAD", act.is_some_and(|e| e.parts().3) as u32 as f64),
            ("ROUND", g.round.is_some() as u32 as f64),
            // The packed operands' and the rounding's format (convert.wgsl).
            convert::fmt_constant(fmt.unwrap_or(Precision::F16)),
        ]);
    }
    if let Kernel::Coop(_) = kernel {
        // A workgroup is one subgroup (the adapter has one subgroup size).
        constants.push(("WG", gpu.info.subgroup_max_size as f64));
    }
    if let Kernel::Blocked(b) = kernel {
        constants.extend([
            ("BM", b.bm as f64),
            ("BN", b.bn as f64),
            ("BK", b.bk as f64),
            ("TM", b.tm as f64),
            ("TN", b.tn as f64),
        ]);
    }
    let buffers = [
        Some(a.tensor().buffer()),
        Some(b.tensor().buffer()),
        bias.map(|t| t.buffer()),
        Some(c.buffer()),
        act.and_then(|e| e.parts().0).map(|t| t.buffer()),
    ];
    // The epilogue kernels take the activation output too (a dummy without
    // one).
    let nbuf = if kernel.has_epilogue() { 5 } else { 4 };
    gpu.dispatch_with(
        shader,
        entry,
        &constants,
        &params,
        &buffers[..nbuf],
        [u(g.n.div_ceil(tile_n)), u(g.m.div_ceil(tile_m)), u(g.batch)],
    )?;
    match g.round {
        // The scalar kernels round in a pass of their own.
        Some(f) if !kernel.has_epilogue() => convert::round_inplace(c, f),
        _ => Ok(()),
    }
}

/// The tiles of matmul_vec4 (build/matmul_gen.rs generates these;
/// tests/shaders.rs checks).
pub const VEC4_TILES: [Tile; 6] = [
    Tile {
        rm: 16,
        rv: 2,
        sg: false,
    },
    Tile {
        rm: 8,
        rv: 2,
        sg: false,
    },
    Tile {
        rm: 12,
        rv: 2,
        sg: false,
    },
    Tile {
        rm: 8,
        rv: 4,
        sg: false,
    },
    Tile {
        rm: 24,
        rv: 2,
        sg: false,
    },
    Tile {
        rm: 4,
        rv: 2,
        sg: false,
    },
];

/// The tiles of matmul_sg (likewise).
pub const SG_TILES: [Tile; 6] = [
    Tile {
        rm: 16,
        rv: 2,
        sg: true,
    },
    Tile {
        rm: 32,
        rv: 1,
        sg: true,
    },
    Tile {
        rm: 24,
        rv: 2,
        sg: true,
    },
    Tile {
        rm: 32,
        rv: 2,
        sg: true,
    },
    Tile {
        rm: 16,
        rv: 4,
        sg: true,
    },
    Tile {
        rm: 8,
        rv: 2,
        sg: true,
    },
];

pub fn tile_name(t: Tile) -> String {
    t.to_string()
}

/// The tile named `s` (e.g. `16x2`, `sg16x2`) if a kernel has it.
pub fn parse_tile(s: &str) -> Option<Tile> {
    Tile::parse(s).filter(has_tile)
}

/// Whether matmul_vec4 or matmul_sg has tile `t`.
fn has_tile(t: &Tile) -> bool {
    VEC4_TILES.iter().chain(&SG_TILES).any(|k| k == t)
}

/// The tile the settings force (`CLIP_WGPU_VEC4_TILE`, `bench --tile`), if
/// any, checked against the kernels' tiles.
fn forced_tile(gpu: &Gpu) -> Result<Option<Tile>> {
    let Some(t) = gpu.settings().vec4_tile else {
        return Ok(None);
    };
    ensure!(
        has_tile(&t),
        "vec4 matmul tile {t} (CLIP_WGPU_VEC4_TILE or --tile): no kernel has it; expected one of {}",
        VEC4_TILES
            .iter()
            .chain(&SG_TILES)
            .map(|t| t.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    );
    Ok(Some(t))
}

/// Without measurements: the largest tile that wastes little of the output
/// (bigger tiles reuse each load more; tiles past the matrix edge are waste).
pub fn heuristic_tile(g: &Gemm) -> Tile {
    let waste = |t: &Tile| {
        let (tm, tn) = (8 * t.rm, 32 * t.rv);
        let covered = g.m.div_ceil(tm) * tm * g.n.div_ceil(tn) * tn;
        covered as f64 / (g.m * g.n).max(1) as f64
    };
    VEC4_TILES
        .iter()
        .copied()
        .find(|t| waste(t) <= 1.25)
        .unwrap_or(Tile {
            rm: 4,
            rv: 2,
            sg: false,
        })
}

/// The blocks of matmul_blocked the tuner tries on GPUs, where the device
/// allows their threads and workgroup memory: large blocks reuse each load
/// most; small ones keep every compute unit busy on small outputs.
pub const BLOCKS: [Block; 10] = [
    blk(128, 128, 8, 8, 8),
    blk(128, 128, 16, 8, 8),
    blk(128, 64, 8, 8, 4),
    blk(64, 128, 8, 4, 8),
    blk(64, 64, 16, 4, 4),
    blk(64, 64, 32, 4, 4),
    blk(64, 64, 8, 4, 4),
    blk(64, 64, 16, 8, 8),
    blk(32, 64, 16, 4, 4),
    blk(32, 32, 16, 4, 4),
];

const fn blk(bm: usize, bn: usize, bk: usize, tm: usize, tn: usize) -> Block {
    Block { bm, bn, bk, tm, tn }
}

/// Whether matmul_blocked can run block `b` on this device (its threads,
/// workgroup memory and private arrays; see the shader's MAX_ constants).
pub fn block_fits(b: &Block, gpu: &Gpu) -> bool {
    let l = &gpu.limits;
    let loads = |outer: usize| (b.bk * outer / 4).div_ceil(b.threads());
    let shape_ok = [b.tm, b.tn].iter().all(|t| *t == 4 || *t == 8)
        && b.bk.is_multiple_of(4)
        && b.bm.is_multiple_of(b.tm)
        && b.bn.is_multiple_of(b.tn);
    shape_ok
        && loads(b.bm) <= 4
        && loads(b.bn) <= 4
        && b.threads() <= l.max_compute_invocations_per_workgroup as usize
        && b.bn / b.tn <= l.max_compute_workgroup_size_x as usize
        && b.bm / b.tm <= l.max_compute_workgroup_size_y as usize
        && b.shared_bytes() <= l.max_compute_workgroup_storage_size as usize
}

/// Without measurements: the largest block that fits the device and wastes
/// little of the output.
pub fn heuristic_block(g: &Gemm, gpu: &Gpu) -> Block {
    let waste = |b: &Block| {
        let covered = g.m.div_ceil(b.bm) * b.bm * g.n.div_ceil(b.bn) * b.bn;
        covered as f64 / (g.m * g.n).max(1) as f64
    };
    let fits: Vec<Block> = BLOCKS
        .iter()
        .copied()
        .filter(|b| block_fits(b, gpu))
        .collect();
    fits.iter()
        .copied()
        .find(|b| waste(b) <= 1.25)
        .or(fits.last().copied())
        .unwrap_or(blk(32, 32, 16, 4, 4))
}

/// The block the settings force (`CLIP_WGPU_MATMUL_BLOCK`, `bench
/// --block`), if any, checked against the device.
fn forced_block(gpu: &Gpu) -> Result<Option<Block>> {
    let Some(b) = gpu.settings().block else {
        return Ok(None);
    };
    ensure!(
        block_fits(&b, gpu),
        "matmul block {b} (CLIP_WGPU_MATMUL_BLOCK or --block): this device cannot run it \
         (threads and tm/tn of 4 or 8 dividing the block, at most 4 vec4 loads a thread, \
         workgroup memory); blocks tried on GPUs: {}",
        BLOCKS
            .iter()
            .map(|b| b.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    );
    Ok(Some(b))
}

/// The kernel for `g`: forced (Gemm fields, the settings' `matmul`,
/// `vec4_tile` and `block`), measured earlier on this adapter, measured now
/// (autotuning on first use of a shape: each candidate timed on these
/// operands into a scratch output), or the heuristic when tuning is off.
fn choose(
    g: &Gemm,
    a: Operand,
    b: Operand,
    c: &Tensor,
    a_bs: usize,
    b_bs: usize,
) -> Result<Kernel> {
    let gpu = a.gpu();
    let settings = gpu.settings();
    let forced_variant = g.variant.is_some() || settings.matmul.is_some();
    let tile = match g.tile {
        Some(t) => Some(t),
        None => forced_tile(gpu)?,
    };
    let block = match g.block {
        Some(b) => Some(b),
        None => forced_block(gpu)?,
    };
    if forced_variant || tile.is_some() || block.is_some() || !settings.tune {
        return Ok(match chosen_variant(g, gpu, a_bs, b_bs) {
            Variant::Regs => Kernel::Regs,
            Variant::Tiled => Kernel::Tiled,
            Variant::Vec4 => Kernel::Vec4(tile.unwrap_or_else(|| heuristic_tile(g))),
            Variant::Blocked => Kernel::Blocked(block.unwrap_or_else(|| heuristic_block(g, gpu))),
            Variant::Coop => Kernel::Coop(gpu.coop.unwrap_or(16)),
        });
    }
    let f16 = a.half() == Some(Precision::F16) && b.half() == a.half();
    let candidates = candidates(g, gpu, a_bs, b_bs, f16);
    if candidates.len() == 1 {
        return Ok(candidates[0]);
    }
    let key = format!(
        "matmul {}x{}x{}x{}{}{}{}{}{}",
        g.batch,
        g.m,
        g.n,
        g.k,
        if g.ta { " ta" } else { "" },
        if g.tb { " tb" } else { "" },
        if a_bs == 0 { " a-shared" } else { "" },
        if b_bs == 0 { " b-shared" } else { "" },
        match (a.half(), b.half()) {
            (_, None) => String::new(),
            (None, Some(f)) => format!(" b:{}", f.name()),
            (Some(f), Some(_)) => format!(" ab:{}", f.name()),
        },
    );
    if let Some(found) = gpu
        .tuned(&key)
        .and_then(|v| candidates.iter().copied().find(|c| c.name() == v))
    {
        return Ok(found);
    }
    let scratch = Tensor::empty(gpu, c.shape())?;
    let candidates = verified(g, a, b, &scratch, &key, candidates)?;
    if candidates.len() == 1 {
        gpu.set_tuned(&key, &candidates[0].name());
        return Ok(candidates[0]);
    }
    let run = |cand: Kernel, reps: usize| {
        let trial = Gemm {
            accumulate: false,
            ..*g
        }
        .kernel(cand);
        crate::gpu::tune::time(gpu, reps, || gemm_into(&scratch, a, b, None, trial))
    };
    // Every candidate briefly, then the three fastest again for longer: the
    // choice is cached for good, so one noisy timing must not decide it.
    let mut timed = Vec::with_capacity(candidates.len());
    for cand in candidates {
        timed.push((run(cand, 3)?, cand));
    }
    timed.sort_by(|x, y| x.0.total_cmp(&y.0));
    let mut best = (f64::INFINITY, timed[0].1);
    for &(_, cand) in timed.iter().take(3) {
        let secs = run(cand, 7)?;
        if secs < best.0 {
            best = (secs, cand);
        }
    }
    gpu.set_tuned(&key, &best.1.name());
    Ok(best.1)
}

/// Self-verification: each candidate's output on these operands against
/// the plain register kernel's (the reference, tested against the CPU on
/// every adapter class). A candidate off by more than 1e-3 of the output's
/// largest value (float32 reorderings stay near 1e-6) is wrong on this
/// adapter: dropped, recorded in the tuning cache as `<key> rejected
/// <kernel>` with the error, and reported once. Candidates rejected before
/// are skipped. Where every candidate is rejected the reference runs, so a
/// shape never goes without a kernel.
fn verified(
    g: &Gemm,
    a: Operand,
    b: Operand,
    scratch: &Tensor,
    key: &str,
    candidates: Vec<Kernel>,
) -> Result<Vec<Kernel>> {
    let gpu = a.gpu();
    let run = |cand: Kernel| -> Result<Vec<f32>> {
        let trial = Gemm {
            accumulate: false,
            ..*g
        }
        .kernel(cand);
        gemm_into(scratch, a, b, None, trial)?;
        scratch.to_vec()
    };
    let want = run(Kernel::Regs)?;
    let (_, scale) = crate::gpu::tune::max_difference(&want, &want);
    let tol = 1e-3 * scale + 1e-6;
    let mut kept = Vec::with_capacity(candidates.len());
    for cand in candidates {
        let name = cand.name();
        let reject_key = format!("{key} rejected {name}");
        if cand == Kernel::Regs {
            kept.push(cand);
            continue;
        }
        if gpu.tuned(&reject_key).is_some() {
            continue;
        }
        let got = run(cand)?;
        let err = got
            .iter()
            .zip(&want)
            .map(|(x, y)| ((x - y) as f64).abs())
            .fold(
                0.0f64,
                |m, d| if d.is_nan() { f64::INFINITY } else { m.max(d) },
            );
        if err <= tol {
            kept.push(cand);
            continue;
        }
        let why = format!(
            "max |difference| {err:.3e} from the register kernel (tolerance {tol:.1e}, largest value {scale:.3e})"
        );
        gpu.set_tuned(&reject_key, &why);
        crate::gpu::tune::report_rejection(&format!("matmul kernel {name}"), key, &why);
    }
    if kept.is_empty() {
        kept.push(Kernel::Regs);
    }
    Ok(kept)
}

/// The kernel `gemm_into(c, a, b, .., g)` runs, by name (e.g. "vec4 16x2").
pub fn kernel_name<'o>(
    g: &Gemm,
    a: impl Into<Operand<'o>>,
    b: impl Into<Operand<'o>>,
    c: &Tensor,
) -> Result<String> {
    let (a, b) = (a.into(), b.into());
    let a_bs = batch_stride(a, g.m * g.k, g.batch, "A")?;
    let b_bs = batch_stride(b, g.k * g.n, g.batch, "B")?;
    Ok(choose(g, a, b, c, a_bs, b_bs)?.name())
}

/// What the tuner tries: on CPU adapters every vec4 tile (the other kernels
/// are several times slower there), on GPUs the tiled and register kernels
/// and, where the shapes allow, the blocks the device fits and the vec4
/// tiles, and the cooperative-matrix kernel where both operands are packed
/// f16 values (`f16`) and the adapter has it.
fn candidates(g: &Gemm, gpu: &Gpu, a_bs: usize, b_bs: usize, f16: bool) -> Vec<Kernel> {
    let mut vec4: Vec<Kernel> = Vec::new();
    if vec4_ok(g, a_bs, b_bs) {
        let sg = if gpu.subgroups_of_8() {
            &SG_TILES[..]
        } else {
            &[]
        };
        vec4.extend(VEC4_TILES.iter().chain(sg).map(|t| Kernel::Vec4(*t)));
    }
    match gpu.class {
        DeviceClass::Cpu if !vec4.is_empty() => vec4,
        DeviceClass::Cpu => vec![Kernel::Regs],
        DeviceClass::Gpu => {
            let mut v = vec![Kernel::Tiled, Kernel::Regs];
            if blocked_ok(g, a_bs, b_bs) {
                v.extend(
                    BLOCKS
                        .iter()
                        .filter(|b| block_fits(b, gpu))
                        .map(|b| Kernel::Blocked(*b)),
                );
                if let (true, Some(size)) = (f16, gpu.coop) {
                    v.push(Kernel::Coop(size));
                }
            }
            v.extend(vec4);
            v
        }
    }
}

/// The kernel that runs `g`: the forced (`g.variant`, the settings'
/// `matmul`) or per-adapter variant, with Vec4 and Blocked falling back when
/// the shapes are not 4-aligned (to Regs on CPU adapters, Tiled on GPUs).
pub fn chosen_variant(g: &Gemm, gpu: &Gpu, a_bs: usize, b_bs: usize) -> Variant {
    let v = g
        .variant
        .or(gpu.settings().matmul)
        .unwrap_or(match gpu.class {
            DeviceClass::Cpu => Variant::Vec4,
            DeviceClass::Gpu => Variant::Tiled,
        });
    match v {
        Variant::Vec4 if !vec4_ok(g, a_bs, b_bs) => Variant::Regs,
        Variant::Blocked if !blocked_ok(g, a_bs, b_bs) => Variant::Tiled,
        // Where the adapter has no cooperative matrices, its default kernel.
        Variant::Coop if gpu.coop.is_none() => {
            let v = match gpu.class {
                DeviceClass::Cpu => Variant::Vec4,
                DeviceClass::Gpu => Variant::Blocked,
            };
            chosen_variant(
                &Gemm {
                    variant: Some(v),
                    ..*g
                },
                gpu,
                a_bs,
                b_bs,
            )
        }
        Variant::Coop if !blocked_ok(g, a_bs, b_bs) => Variant::Tiled,
        v => v,
    }
}

/// matmul_vec4 loads whole vec4s: B along n, A along k (or m when stored
/// transposed), so those extents and the batch strides must be multiples of 4.
fn vec4_ok(g: &Gemm, a_bs: usize, b_bs: usize) -> bool {
    let a_axis = if g.ta { g.m } else { g.k };
    g.n.is_multiple_of(4) && a_axis % 4 == 0 && a_bs.is_multiple_of(4) && b_bs.is_multiple_of(4)
}

/// matmul_blocked loads whole vec4s along each operand's contiguous axis (B
/// transposed too) and stores vec4s of C.
fn blocked_ok(g: &Gemm, a_bs: usize, b_bs: usize) -> bool {
    vec4_ok(g, a_bs, b_bs) && (!g.tb || g.k.is_multiple_of(4))
}

/// `g` into a new [batch, m, n] tensor.
pub fn gemm<'o>(
    a: impl Into<Operand<'o>>,
    b: impl Into<Operand<'o>>,
    bias: Option<&Tensor>,
    g: Gemm,
) -> Result<Tensor> {
    ensure!(!g.accumulate, "gemm: accumulate needs an existing output");
    let a = a.into();
    let c = Tensor::empty(a.gpu(), &[g.batch, g.m, g.n])?;
    gemm_into(&c, a, b, bias, g)?;
    Ok(c)
}

/// Gradients of C = alpha op(A) op(B) for the operands that need them.
pub fn gemm_backward(
    dc: &Tensor,
    a: &Tensor,
    b: &Tensor,
    g: Gemm,
    need_a: bool,
    need_b: bool,
) -> Result<(Option<Tensor>, Option<Tensor>)> {
    let Gemm {
        batch,
        m,
        n,
        k,
        ta,
        tb,
        alpha,
        variant,
        ..
    } = g;
    // The gradient matmuls run the kernel forced on `g`, if any.
    let with = |x: Gemm| Gemm {
        variant,
        tile: g.tile,
        block: g.block,
        ..x
    };
    // A shared across the batch (a weight) gets its gradient summed over it.
    let a_shared = a.numel() == m * k && batch > 1;
    let b_shared = b.numel() == k * n && batch > 1;
    let da = if !need_a {
        None
    } else {
        let t = if !ta {
            // dA = alpha dC op(B)^T : [m, k]
            grad_operand(
                dc,
                b,
                with(Gemm::new(batch, m, k, n).tb(!tb).alpha(alpha)),
                a_shared,
            )?
        } else {
            // stored A^T: dA^T = alpha op(B) dC^T : [k, m]
            grad_operand(
                b,
                dc,
                with(Gemm::new(batch, k, m, n).ta(tb).tb(true).alpha(alpha)),
                a_shared,
            )?
        };
        Some(t.reshape(a.shape())?)
    };
    let db = if !need_b {
        None
    } else {
        let t = if !tb {
            // dB = alpha op(A)^T dC : [k, n]
            grad_operand(
                a,
                dc,
                with(Gemm::new(batch, k, n, m).ta(!ta).alpha(alpha)),
                b_shared,
            )?
        } else {
            // stored B^T: dB^T = alpha dC^T op(A) : [n, k]
            grad_operand(
                dc,
                a,
                with(Gemm::new(batch, n, k, m).ta(true).tb(ta).alpha(alpha)),
                b_shared,
            )?
        };
        Some(t.reshape(b.shape())?)
    };
    Ok((da, db))
}

/// One operand gradient; for a shared operand the batch entries are summed
/// by accumulating each batch entry's product into one output.
fn grad_operand(x: &Tensor, y: &Tensor, g: Gemm, shared: bool) -> Result<Tensor> {
    if !shared {
        return gemm(x, y, None, g);
    }
    // Operands that do vary over the batch are sliced by offset: run the
    // batch as one taller product instead where the layout allows it.
    let out = Tensor::zeros(x.gpu(), &[g.m, g.n])?;
    for bi in 0..g.batch {
        let xs = slice_batch(x, bi, g.batch)?;
        let ys = slice_batch(y, bi, g.batch)?;
        gemm_into(
            &out,
            &xs,
            &ys,
            None,
            Gemm {
                batch: 1,
                accumulate: true,
                ..g
            },
        )?;
    }
    Ok(out)
}

/// Batch entry `i` of a tensor holding `batch` equal matrices (or the
/// tensor itself when it is shared).
fn slice_batch(t: &Tensor, i: usize, batch: usize) -> Result<Tensor> {
    if !t.numel().is_multiple_of(batch) || batch == 1 {
        return Ok(t.clone());
    }
    let per = t.numel() / batch;
    let out = Tensor::empty(t.gpu(), &[per])?;
    t.gpu().copy_range(
        t.buffer(),
        (i * per * 4) as u64,
        out.buffer(),
        (per * 4) as u64,
    );
    Ok(out)
}

/// Tape op: y = x W^T (+ b) for x [..., in], W [out, in] (Hugging Face's
/// nn.Linear layout), b [out]. In a half mode, as under autocast: x, W and b
/// rounded to the format, f32 accumulation, y rounded (in the matmul's
/// epilogue). The matmul reads x's and W's 16-bit copies; the backward
/// keeps x's and packs W again from the f32 master weights (no second copy
/// held between the passes). At f32 every copy is the tensor itself.
pub fn linear(tape: &mut Tape, x: &Var, w: &Var, b: Option<&Var>) -> Result<Var> {
    let fmt = tape.precision();
    let (g, ys) = linear_shape(x, w)?;
    let keep = tape.grad_enabled()
        && (x.requires_grad() || w.requires_grad() || b.is_some_and(|b| b.requires_grad()));
    let xs = convert::save(x.tensor(), fmt)?;
    let wc = convert::cast(w.tensor(), fmt)?;
    let br = b
        .map(|b| convert::round_copy(b.tensor(), fmt))
        .transpose()?;
    let y = gemm(&xs, &wc, br.as_ref(), g.round(fmt))?.reshape(&ys)?;
    drop((wc, br));
    if !keep {
        return Ok(Var::constant(y));
    }
    Ok(record_linear(tape, y, x, w, b, g, xs, fmt))
}

/// The matmul of nn.Linear for x [.., in] and w [out, in], and y's shape.
fn linear_shape(x: &Var, w: &Var) -> Result<(Gemm, Vec<usize>)> {
    let xs = x.shape().to_vec();
    let ws = w.shape();
    ensure!(
        ws.len() == 2 && xs.last() == Some(&ws[1]),
        "linear: input {:?} does not match weight {:?}",
        xs,
        ws
    );
    let (out_f, in_f) = (ws[0], ws[1]);
    let rows = x.tensor().numel() / in_f;
    let mut ys = xs.clone();
    *ys.last_mut().unwrap() = out_f;
    Ok((Gemm::new(1, rows, out_f, in_f).tb(true), ys))
}

/// Record y = x W^T + b (computed by the caller) with its backward, which
/// reads x from `xs` and W cast to `fmt` (the f32 weights at f32).
#[allow(clippy::too_many_arguments)]
fn record_linear(
    tape: &mut Tape,
    y: Tensor,
    x: &Var,
    w: &Var,
    b: Option<&Var>,
    g: Gemm,
    xs: convert::Saved,
    fmt: Precision,
) -> Var {
    let wt = w.tensor().clone();
    let mut inputs = vec![x, w];
    if let Some(b) = b {
        inputs.push(b);
    }
    tape.record_acc(
        y,
        &inputs,
        Box::new(move |dy, needs, acc| {
            let need_b = needs.len() > 2 && needs[2];
            let dx_into = if needs[0] { acc[0].take() } else { None };
            // W is read only for dx.
            let w = if needs[0] {
                convert::cast(&wt, fmt)?
            } else {
                convert::Saved::Full(wt.clone())
            };
            let (dx, dw, db) = linear_grads(dy, &xs, &w, g, needs[0], needs[1], need_b, dx_into)?;
            let mut out = vec![dx, dw];
            if needs.len() > 2 {
                out.push(db);
            }
            Ok(out)
        }),
    )
}

/// Gradients of y = x W^T + b (`g` the forward's matmul, dy [rows, out]):
/// dx (added into `dx_into`, a pending gradient of x, when given), dW and
/// db, the bias gradient in the weight gradient's pass where both are needed.
#[allow(clippy::too_many_arguments)]
pub fn linear_grads<'o>(
    dy: &Tensor,
    x: impl Into<Operand<'o>>,
    w: impl Into<Operand<'o>>,
    g: Gemm,
    need_x: bool,
    need_w: bool,
    need_b: bool,
    dx_into: Option<Tensor>,
) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
    let (rows, out_f, in_f) = (g.m, g.n, g.k);
    let (x, w) = (x.into(), w.into());
    let gpu = dy.gpu();
    let dx = if need_x {
        // dx = dy W : [rows, in].
        let gx = Gemm {
            variant: g.variant,
            accumulate: dx_into.is_some(),
            ..Gemm::new(1, rows, in_f, out_f)
        };
        let dx = match dx_into {
            Some(t) => {
                gemm_into(&t, dy, w, None, gx)?;
                t
            }
            None => gemm(dy, w, None, gx)?,
        };
        Some(dx.reshape(x.shape())?)
    } else {
        None
    };
    let db = need_b.then(|| Tensor::empty(gpu, &[out_f])).transpose()?;
    let dw = if need_w {
        // dW = dy^T x : [out, in].
        let dw = Tensor::empty(gpu, w.shape())?;
        let gw = Gemm {
            variant: g.variant,
            ..Gemm::new(1, out_f, in_f, rows).ta(true)
        };
        gemm_act_into(&dw, dy, x, None, gw, db.as_ref().map(Epilogue::BiasGrad))?;
        Some(dw)
    } else {
        if let Some(db) = &db {
            reduce::colsum_into(dy, rows, out_f, db, false)?;
        }
        None
    };
    Ok((dx, dw, db))
}

/// Tape op: batched C = alpha op(A) op(B) (attention scores, P V, logits).
pub fn matmul(tape: &mut Tape, a: &Var, b: &Var, g: Gemm) -> Result<Var> {
    let c = gemm(a.tensor(), b.tensor(), None, g)?;
    let (at, bt) = (a.tensor().clone(), b.tensor().clone());
    Ok(tape.record(
        c,
        &[a, b],
        Box::new(move |dc, needs| {
            let (da, db) = gemm_backward(dc, &at, &bt, g, needs[0], needs[1])?;
            Ok(vec![da, db])
        }),
    ))
}

/// CPU reference of `gemm` (f64, no accumulate).
pub fn gemm_ref(a: &[f64], b: &[f64], bias: Option<&[f64]>, g: Gemm) -> Vec<f64> {
    let Gemm {
        batch,
        m,
        n,
        k,
        ta,
        tb,
        alpha,
        ..
    } = g;
    let a_bs = if a.len() == m * k { 0 } else { m * k };
    let b_bs = if b.len() == k * n { 0 } else { k * n };
    let mut c = vec![0.0; batch * m * n];
    for bi in 0..batch {
        for i in 0..m {
            for j in 0..n {
                let mut s = 0.0;
                for kk in 0..k {
                    let av = if ta {
                        a[bi * a_bs + kk * m + i]
                    } else {
                        a[bi * a_bs + i * k + kk]
                    };
                    let bv = if tb {
                        b[bi * b_bs + j * k + kk]
                    } else {
                        b[bi * b_bs + kk * n + j]
                    };
                    s += av * bv;
                }
                c[(bi * m + i) * n + j] = alpha as f64 * s + bias.map_or(0.0, |bb| bb[j]);
            }
        }
    }
    c
}

/// CPU reference of `gemm_backward`: (dA, dB) in the operands' stored layout.
pub fn gemm_backward_ref(dc: &[f64], a: &[f64], b: &[f64], g: Gemm) -> (Vec<f64>, Vec<f64>) {
    let Gemm {
        batch,
        m,
        n,
        k,
        ta,
        tb,
        alpha,
        ..
    } = g;
    let a_bs = if a.len() == m * k { 0 } else { m * k };
    let b_bs = if b.len() == k * n { 0 } else { k * n };
    let mut da = vec![0.0; a.len()];
    let mut db = vec![0.0; b.len()];
    let alpha = alpha as f64;
    for bi in 0..batch {
        for i in 0..m {
            for j in 0..n {
                let d = alpha * dc[(bi * m + i) * n + j];
                for kk in 0..k {
                    let ai = if ta {
                        bi * a_bs + kk * m + i
                    } else {
                        bi * a_bs + i * k + kk
                    };
                    let bj = if tb {
                        bi * b_bs + j * k + kk
                    } else {
                        bi * b_bs + kk * n + j
                    };
                    da[ai] += d * b[bj];
                    db[bj] += d * a[ai];
                }
            }
        }
    }
    (da, db)
}

//! The user's settings for kernel choices and run behaviour, read once into
//! a [`Settings`] that each [`Gpu`](super::Gpu) owns: ops and model code ask
//! `gpu.settings()`, never the environment.
//!
//! [`Settings::from_env`] (what `Gpu::new` uses) reads the `CLIP_WGPU_*`
//! variables below; a value it cannot parse is an error that names the
//! variable and the value. Programs set fields from their own flags instead
//! (`Gpu::with_settings`, `Gpu::set_settings`).
//!
//! | field | variable | values |
//! | --- | --- | --- |
//! | `matmul` | `CLIP_WGPU_MATMUL` | `regs`, `vec4`, `tiled`, `blocked`, `coop` |
//! | `vec4_tile` | `CLIP_WGPU_VEC4_TILE` | e.g. `16x2`, `sg16x2` |
//! | `block` | `CLIP_WGPU_MATMUL_BLOCK` | e.g. `64x64x16/4x4` |
//! | `attention` | `CLIP_WGPU_ATTENTION` | `fused`, `tiled`, `unfused` |
//! | `rows` | `CLIP_WGPU_ROWS` | `thread`, `workgroup` |
//! | `tune` | `CLIP_WGPU_TUNE` | `1` (default), `0` |
//! | `cache_dir` | `CLIP_WGPU_CACHE_DIR` | a folder |
//! | `full_text` | `CLIP_WGPU_FULL_TEXT` | `0` (default), `1` |
//! | `profile_params` | `CLIP_WGPU_PROFILE_PARAMS` | `0` (default), `1` |
//!
//! Flags take `1`/`true`/`on`/`yes` or `0`/`false`/`off`/`no`; an empty
//! variable counts as unset. Read elsewhere, because they are needed before
//! a `Gpu` exists or outside it: `CLIP_WGPU_BACKEND` and `CLIP_WGPU_ADAPTER`
//! (adapter selection, `adapter.rs`), `CLIP_WGPU_GROUP_HOST_MIB` (the
//! trainer's host memory) and `CLIP_WGPU_FAULTS` (the trainer's fault
//! injection for tests).
//!
//! The kinds of choice (`Variant`, `Tile`, `Rows`) are defined here, below
//! the ops that run them (`ops::matmul` and `ops::layernorm` re-export them
//! with their kernel code).

use anyhow::{bail, Result};
use std::ffi::OsString;
use std::fmt;
use std::path::PathBuf;

/// The user's settings (see the module docs for their variables).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Settings {
    /// Force the matmul kernel; `None`: measured per adapter and shape.
    pub matmul: Option<Variant>,
    /// Force matmul_vec4's register tile; `None`: measured or heuristic.
    pub vec4_tile: Option<Tile>,
    /// Force matmul_blocked's block; `None`: measured or heuristic.
    pub block: Option<Block>,
    /// Force attention fused or not; `None`: measured per shape.
    pub attention: Option<Attention>,
    /// Force the layout of the row kernels; `None`: per adapter class.
    pub rows: Option<Rows>,
    /// Measure kernel choices on first use (off: built-in heuristics).
    pub tune: bool,
    /// Where measured choices are kept: `CLIP_WGPU_CACHE_DIR`, else
    /// `$XDG_CACHE_HOME/clip-wgpu`, else `~/.cache/clip-wgpu`; `None`: in
    /// memory only.
    pub cache_dir: Option<PathBuf>,
    /// Text towers run the whole padded length (for comparing kernel speed
    /// with frameworks that do) instead of stopping at the last position the
    /// output depends on.
    pub full_text: bool,
    /// Kernel names in profiles carry their parameter words.
    pub profile_params: bool,
    /// Test hook: the matmul candidate of this name (e.g. "vec4 16x2")
    /// computes wrong results, to show that the tuner's self-verification
    /// rejects it. Never set outside tests.
    pub broken_kernel: Option<String>,
}

/// Built-in defaults, with no cache folder (choices kept in memory only);
/// [`Settings::from_env`] is what a `Gpu` gets unless told otherwise.
impl Default for Settings {
    fn default() -> Settings {
        Settings {
            matmul: None,
            vec4_tile: None,
            block: None,
            attention: None,
            rows: None,
            tune: true,
            cache_dir: None,
            full_text: false,
            profile_params: false,
            broken_kernel: None,
        }
    }
}

impl Settings {
    /// Settings from this process's environment.
    pub fn from_env() -> Result<Settings> {
        Settings::from_vars(|k| std::env::var_os(k))
    }

    /// Settings from the variables `var` looks up (the environment, or a
    /// table in tests).
    pub fn from_vars(var: impl Fn(&str) -> Option<OsString>) -> Result<Settings> {
        let v = Vars(var);
        let dir = |name: &str| (v.0)(name).filter(|d| !d.is_empty()).map(PathBuf::from);
        Ok(Settings {
            matmul: v.choice(
                "CLIP_WGPU_MATMUL",
                Variant::parse,
                "regs, vec4, tiled, blocked or coop",
            )?,
            vec4_tile: v.choice(
                "CLIP_WGPU_VEC4_TILE",
                Tile::parse,
                "a tile RMxRV such as 16x2, or sgRMxRV such as sg16x2",
            )?,
            block: v.choice(
                "CLIP_WGPU_MATMUL_BLOCK",
                Block::parse,
                "a block BMxBNxBK/TMxTN such as 64x64x16/4x4",
            )?,
            attention: v.choice(
                "CLIP_WGPU_ATTENTION",
                Attention::parse,
                "fused, tiled or unfused",
            )?,
            rows: v.choice("CLIP_WGPU_ROWS", Rows::parse, "thread or workgroup")?,
            tune: v.flag("CLIP_WGPU_TUNE", true)?,
            cache_dir: dir("CLIP_WGPU_CACHE_DIR")
                .or_else(|| dir("XDG_CACHE_HOME").map(|d| d.join("clip-wgpu")))
                .or_else(|| dir("HOME").map(|h| h.join(".cache").join("clip-wgpu"))),
            full_text: v.flag("CLIP_WGPU_FULL_TEXT", false)?,
            profile_params: v.flag("CLIP_WGPU_PROFILE_PARAMS", false)?,
            broken_kernel: None,
        })
    }
}

/// Variables by name, parsed with errors that name the variable and value.
struct Vars<F>(F);

impl<F: Fn(&str) -> Option<OsString>> Vars<F> {
    /// The value, `None` when unset or empty.
    fn get(&self, name: &str) -> Result<Option<String>> {
        match (self.0)(name) {
            None => Ok(None),
            Some(v) if v.is_empty() => Ok(None),
            Some(v) => match v.into_string() {
                Ok(s) => Ok(Some(s)),
                Err(v) => bail!("{name}={v:?} is not valid UTF-8"),
            },
        }
    }

    /// One of a few words (`parse` says which), `None` when unset.
    fn choice<T>(
        &self,
        name: &str,
        parse: fn(&str) -> Option<T>,
        expected: &str,
    ) -> Result<Option<T>> {
        let Some(v) = self.get(name)? else {
            return Ok(None);
        };
        match parse(v.trim()) {
            Some(c) => Ok(Some(c)),
            None => bail!("{name}={v:?}: expected {expected}"),
        }
    }

    /// On or off, `default` when unset.
    fn flag(&self, name: &str, default: bool) -> Result<bool> {
        let Some(v) = self.get(name)? else {
            return Ok(default);
        };
        match v.trim().to_ascii_lowercase().as_str() {
            "1" | "true" | "on" | "yes" => Ok(true),
            "0" | "false" | "off" | "no" => Ok(false),
            _ => bail!("{name}={v:?}: expected 1 or 0 (true/false, on/off, yes/no)"),
        }
    }
}

/// Which matmul kernel runs (`ops::matmul`): chosen per adapter and shape
/// unless forced.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Variant {
    /// Register-blocked, no workgroup memory: best on CPU adapters.
    Regs,
    /// `Regs` with vec4 loads of B (n % 4 == 0, B not transposed; the host
    /// transposes B first): the CPU-adapter default.
    Vec4,
    /// Workgroup-memory tiles, scalar loads: GPUs, any shape.
    Tiled,
    /// Workgroup-memory blocks with register blocks, vec4 loads and double
    /// buffering (matmul_blocked, a [`Block`] each): GPUs, 4-aligned shapes.
    Blocked,
    /// Cooperative matrices (matmul_coop: tensor cores, simdgroup matrices)
    /// with the operands rounded to f16 and f32 accumulation: only where
    /// the adapter has them, and only when forced (the half-precision
    /// modes' kernel; in f32 runs it would round the operands).
    Coop,
}

impl Variant {
    /// `regs`, `vec4`, `tiled`, `blocked` or `coop`.
    pub fn parse(s: &str) -> Option<Variant> {
        match s {
            "regs" => Some(Variant::Regs),
            "vec4" => Some(Variant::Vec4),
            "tiled" => Some(Variant::Tiled),
            "blocked" => Some(Variant::Blocked),
            "coop" => Some(Variant::Coop),
            _ => None,
        }
    }
}

/// A register tile of matmul_vec4: rows x vec4 column groups per thread
/// (`ops::matmul` lists the tiles its kernels have).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tile {
    pub rm: usize,
    pub rv: usize,
    /// The subgroup version (shaders/matmul_sg.wgsl).
    pub sg: bool,
}

impl Tile {
    /// `RMxRV` or `sgRMxRV` (the form only: whether a kernel has the tile
    /// is `ops::matmul::parse_tile`'s question).
    pub fn parse(s: &str) -> Option<Tile> {
        let (sg, rest) = match s.strip_prefix("sg") {
            Some(rest) => (true, rest),
            None => (false, s),
        };
        let (rm, rv) = rest.split_once('x')?;
        Some(Tile {
            rm: rm.parse().ok()?,
            rv: rv.parse().ok()?,
            sg,
        })
    }
}

impl fmt::Display for Tile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let sg = if self.sg { "sg" } else { "" };
        write!(f, "{sg}{}x{}", self.rm, self.rv)
    }
}

/// A block of matmul_blocked, the GPU matmul: a workgroup computes bm x bn
/// of C in steps of bk along k, each thread tm x tn of it (`ops::matmul`
/// lists the blocks the tuner tries).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Block {
    pub bm: usize,
    pub bn: usize,
    pub bk: usize,
    pub tm: usize,
    pub tn: usize,
}

impl Block {
    /// `BMxBNxBK/TMxTN`, e.g. `64x64x16/4x4` (the form only: which blocks
    /// a device can run is `ops::matmul`'s question).
    pub fn parse(s: &str) -> Option<Block> {
        let (outer, inner) = s.split_once('/')?;
        let num = |x: &str| x.parse::<usize>().ok();
        let mut o = outer.split('x').map(num);
        let (bm, bn, bk) = (o.next()??, o.next()??, o.next()??);
        let (tm, tn) = inner.split_once('x')?;
        if o.next().is_some() {
            return None;
        }
        Some(Block {
            bm,
            bn,
            bk,
            tm: num(tm)?,
            tn: num(tn)?,
        })
    }

    /// Threads a workgroup.
    pub fn threads(&self) -> usize {
        (self.bm / self.tm) * (self.bn / self.tn)
    }

    /// Bytes of workgroup memory (two halves of both tiles).
    pub fn shared_bytes(&self) -> usize {
        2 * self.bk * (self.bm + self.bn) * 4
    }
}

impl fmt::Display for Block {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}x{}x{}/{}x{}",
            self.bm, self.bn, self.bk, self.tm, self.tn
        )
    }
}

/// Whether attention runs as one fused kernel or from its pieces.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Attention {
    /// Fused where the head size has a fused kernel, else unfused.
    Fused,
    /// The tiled (GPU) fused kernels where the head size allows them (a
    /// multiple of 4 up to 128), else unfused.
    Tiled,
    Unfused,
}

impl Attention {
    /// `fused`, `tiled` or `unfused`.
    pub fn parse(s: &str) -> Option<Attention> {
        match s {
            "fused" => Some(Attention::Fused),
            "tiled" => Some(Attention::Tiled),
            "unfused" => Some(Attention::Unfused),
            _ => None,
        }
    }
}

/// Layout of a kernel that reduces along rows (layer norm, softmax, l2norm;
/// `ops::layernorm` launches them): chosen per adapter class unless forced.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rows {
    /// One thread per row: SIMD lanes run different rows, no barriers (CPU
    /// adapters such as lavapipe).
    Thread,
    /// One 64-thread workgroup per row with a fixed tree reduction
    /// (coalesced loads: GPUs).
    Workgroup,
}

impl Rows {
    /// `thread` or `workgroup`.
    pub fn parse(s: &str) -> Option<Rows> {
        match s {
            "thread" => Some(Rows::Thread),
            "workgroup" => Some(Rows::Workgroup),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn from(vars: &[(&str, &str)]) -> Result<Settings> {
        let vars: Vec<(String, OsString)> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), OsString::from(v)))
            .collect();
        Settings::from_vars(|k| vars.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone()))
    }

    #[test]
    fn unset_is_the_default() {
        assert_eq!(from(&[]).unwrap(), Settings::default());
        assert_eq!(
            from(&[("CLIP_WGPU_MATMUL", ""), ("CLIP_WGPU_TUNE", "")]).unwrap(),
            Settings::default()
        );
    }

    #[test]
    fn values_parse() {
        let s = from(&[
            ("CLIP_WGPU_MATMUL", "vec4"),
            ("CLIP_WGPU_VEC4_TILE", "sg16x2"),
            ("CLIP_WGPU_MATMUL_BLOCK", "128x64x8/8x4"),
            ("CLIP_WGPU_ATTENTION", "unfused"),
            ("CLIP_WGPU_ROWS", "workgroup"),
            ("CLIP_WGPU_TUNE", "off"),
            ("CLIP_WGPU_FULL_TEXT", "1"),
            ("CLIP_WGPU_PROFILE_PARAMS", "yes"),
            ("XDG_CACHE_HOME", "/x"),
        ])
        .unwrap();
        assert_eq!(s.matmul, Some(Variant::Vec4));
        let tile = s.vec4_tile.unwrap();
        assert_eq!((tile.rm, tile.rv, tile.sg), (16, 2, true));
        assert_eq!(tile.to_string(), "sg16x2");
        let block = s.block.unwrap();
        assert_eq!(
            (block.bm, block.bn, block.bk, block.tm, block.tn),
            (128, 64, 8, 8, 4)
        );
        assert_eq!(block.to_string(), "128x64x8/8x4");
        assert_eq!(s.attention, Some(Attention::Unfused));
        assert_eq!(s.rows, Some(Rows::Workgroup));
        assert!(!s.tune && s.full_text && s.profile_params);
        assert_eq!(s.cache_dir, Some(PathBuf::from("/x/clip-wgpu")));
    }

    #[test]
    fn the_cache_folder_falls_back_to_home() {
        let s = from(&[("HOME", "/h")]).unwrap();
        assert_eq!(s.cache_dir, Some(PathBuf::from("/h/.cache/clip-wgpu")));
        let s = from(&[("HOME", "/h"), ("CLIP_WGPU_CACHE_DIR", "/c")]).unwrap();
        assert_eq!(s.cache_dir, Some(PathBuf::from("/c")));
    }

    #[test]
    fn errors_name_the_variable_and_value() {
        for (name, value) in [
            ("CLIP_WGPU_MATMUL", "fast"),
            ("CLIP_WGPU_VEC4_TILE", "16by2"),
            ("CLIP_WGPU_MATMUL_BLOCK", "64x64/4x4"),
            ("CLIP_WGPU_ATTENTION", "maybe"),
            ("CLIP_WGPU_ROWS", "col"),
            ("CLIP_WGPU_TUNE", "2"),
            ("CLIP_WGPU_FULL_TEXT", "all"),
        ] {
            let e = from(&[(name, value)]).unwrap_err().to_string();
            assert!(e.contains(name) && e.contains(&format!("{value:?}")), "{e}");
        }
    }
}

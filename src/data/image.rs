//! `CLIPImageProcessor`, bit for bit.
//!
//! A CLIP checkpoint only works well on pixels prepared the way it was trained
//! on, so this reproduces transformers' processor exactly rather than
//! approximately. In transformers 5.24, `CLIPImageProcessor` is the
//! torchvision backend when torchvision is installed and otherwise falls back
//! to `CLIPImageProcessorPil` (PIL + numpy), which is also what every earlier
//! transformers version and OpenAI's own CLIP code compute. We match the PIL
//! path (the reference environment has no torchvision):
//!
//! 0. Decoding: JPEGs through [`crate::data::jpeg`], which matches PIL's
//!    libjpeg-turbo bit for bit (the `image` crate's decoder is up to 4/255
//!    off); other formats through the `image` crate, whose PNG/GIF/BMP/
//!    lossless-WebP decodes are exact.
//! 1. `convert_to_rgb`: images with alpha (an alpha band, or a `transparency`
//!    entry such as palette + tRNS) are alpha-composited onto opaque white with
//!    PIL's integer `alpha_composite`; grey is replicated.
//! 2. Resize so that the short side is `shortest_edge` and the long side is
//!    `int(shortest_edge * long / short)`, with PIL's `Image.resize`: a
//!    separable convolution (horizontal pass, then vertical, except vertical
//!    first when it shrinks while the horizontal grows), the filter
//!    support widened by the downscale factor (antialiasing), 22-bit
//!    fixed-point coefficients, and rounding + clamping to u8 after each pass.
//! 3. Center crop at `((h - crop_h) // 2, (w - crop_w) // 2)`, zero-padding an
//!    image smaller than the crop.
//! 4. `x * rescale_factor` in f64 rounded to f32, then `(x - mean) / std` in f32.
//!
//! The u8 stage is exposed ([`resize_and_crop`]) so that callers can cache or
//! upload u8 pixels and normalize later.

use anyhow::{bail, ensure, Context, Result};
use image::{DynamicImage, ImageFormat, ImageReader, RgbImage};
use serde_json::{Map, Value};
use std::fmt;
use std::io::Cursor;
use std::path::{Path, PathBuf};

/// OpenAI CLIP's per-channel mean (transformers' `OPENAI_CLIP_MEAN`).
pub const OPENAI_CLIP_MEAN: [f32; 3] = [0.48145466, 0.4578275, 0.40821073];
/// OpenAI CLIP's per-channel std (transformers' `OPENAI_CLIP_STD`).
pub const OPENAI_CLIP_STD: [f32; 3] = [0.26862954, 0.261_302_6, 0.275_777_1];

/// PIL's resampling filter codes (`PIL.Image.Resampling`), as stored in
/// `preprocessor_config.json` under `"resample"`.
pub mod resample {
    pub const NEAREST: u32 = 0;
    pub const LANCZOS: u32 = 1;
    pub const BILINEAR: u32 = 2;
    pub const BICUBIC: u32 = 3;
    pub const BOX: u32 = 4;
    pub const HAMMING: u32 = 5;
}

/// The settings of a `CLIPImageProcessor` (`preprocessor_config.json`).
#[derive(Clone, Debug, PartialEq)]
pub struct ImageProcessorConfig {
    /// Target of the short side (`size: {"shortest_edge": N}`, or an int size).
    pub shortest_edge: usize,
    /// `size: {"height": H, "width": W}`: resize to exactly (H, W), ignoring
    /// the aspect ratio and `shortest_edge`.
    pub resize_to: Option<(usize, usize)>,
    pub crop_h: usize,
    pub crop_w: usize,
    pub do_resize: bool,
    pub do_center_crop: bool,
    pub do_rescale: bool,
    pub do_normalize: bool,
    /// f64 because transformers multiplies in float64 before casting to f32;
    /// an f32 factor would be off by one ulp on some pixels.
    pub rescale_factor: f64,
    pub mean: [f32; 3],
    pub std: [f32; 3],
    /// PIL resampling code (see [`resample`]); 3 = bicubic.
    pub resample: u32,
    pub do_convert_rgb: bool,
}

impl Default for ImageProcessorConfig {
    /// openai/clip-vit-base-patch32's processor.
    fn default() -> Self {
        ImageProcessorConfig {
            shortest_edge: 224,
            resize_to: None,
            crop_h: 224,
            crop_w: 224,
            do_resize: true,
            do_center_crop: true,
            do_rescale: true,
            do_normalize: true,
            rescale_factor: 1.0 / 255.0,
            mean: OPENAI_CLIP_MEAN,
            std: OPENAI_CLIP_STD,
            resample: resample::BICUBIC,
            do_convert_rgb: true,
        }
    }
}

/// Where [`ImageProcessorConfig::from_model_dir_with_source`] found its settings.
#[derive(Clone, Debug, PartialEq)]
pub enum ConfigSource {
    /// `preprocessor_config.json`, or `processor_config.json` (transformers 5
    /// nests the image processor under its `"image_processor"` key).
    File(PathBuf),
    /// No config in the directory; the defaults were used.
    Default { dir: PathBuf },
}

impl fmt::Display for ConfigSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConfigSource::File(p) => write!(f, "image processor settings from {}", p.display()),
            ConfigSource::Default { dir } => write!(
                f,
                "no preprocessor_config.json (nor processor_config.json with an \"image_processor\" \
                 entry) in {}; using openai/clip-vit-base-patch32's CLIPImageProcessor defaults \
                 (shortest edge 224, center crop 224, bicubic, OpenAI mean/std)",
                dir.display()
            ),
        }
    }
}

impl ImageProcessorConfig {
    /// Read the model directory's image processor settings; prints a note on
    /// stderr when there are none and the defaults are used.
    pub fn from_model_dir(dir: &Path) -> Result<Self> {
        let (cfg, source) = Self::from_model_dir_with_source(dir)?;
        if let ConfigSource::Default { .. } = source {
            eprintln!("note: {source}");
        }
        Ok(cfg)
    }

    /// As transformers' `from_pretrained` looks: `processor_config.json` if it
    /// has an `"image_processor"` entry, else `preprocessor_config.json`, else
    /// (unlike transformers, which fails) the defaults.
    pub fn from_model_dir_with_source(dir: &Path) -> Result<(Self, ConfigSource)> {
        let processor = dir.join("processor_config.json");
        if processor.is_file() {
            let v = read_json(&processor)?;
            if let Some(ip) = v.get("image_processor") {
                let cfg = Self::from_json(ip, &processor, "image_processor.")?;
                return Ok((cfg, ConfigSource::File(processor)));
            }
        }
        let pre = dir.join("preprocessor_config.json");
        if pre.is_file() {
            let v = read_json(&pre)?;
            let cfg = Self::from_json(&v, &pre, "")?;
            return Ok((cfg, ConfigSource::File(pre)));
        }
        ensure!(
            dir.is_dir(),
            "model directory {} does not exist",
            dir.display()
        );
        Ok((
            Self::default(),
            ConfigSource::Default {
                dir: dir.to_path_buf(),
            },
        ))
    }

    /// Parse an image processor JSON object. Missing or `null` keys take
    /// `CLIPImageProcessor`'s class defaults, as in transformers. `file` and
    /// `prefix` only name the place in error messages.
    pub fn from_json(v: &Value, file: &Path, prefix: &str) -> Result<Self> {
        let obj = v.as_object().with_context(|| {
            format!(
                "{}: {}image processor settings must be a JSON object",
                file.display(),
                prefix
            )
        })?;
        let p = Parser { obj, file, prefix };
        let d = Self::default();
        let default_to_square = p.bool("default_to_square", false)?;
        let (shortest_edge, resize_to) = match p.size("size", default_to_square)? {
            None => (d.shortest_edge, None),
            Some(Size::Shortest(n)) => (n, None),
            Some(Size::Exact(h, w)) => (d.shortest_edge, Some((h, w))),
        };
        let (crop_h, crop_w) = match p.size("crop_size", true)? {
            None => (d.crop_h, d.crop_w),
            Some(Size::Exact(h, w)) => (h, w),
            Some(Size::Shortest(_)) => {
                bail!(
                    "{}: {}crop_size must have height and width",
                    file.display(),
                    prefix
                )
            }
        };
        let resample = match p.get("resample") {
            None => d.resample,
            Some(r) => match r.as_u64() {
                Some(c @ 0..=5) => c as u32,
                _ => bail!(
                    "{}: {}resample must be a PIL filter code 0..=5 (3 = bicubic), got {r}",
                    file.display(),
                    prefix
                ),
            },
        };
        let rescale_factor = match p.get("rescale_factor") {
            None => d.rescale_factor,
            Some(r) => r.as_f64().with_context(|| {
                format!(
                    "{}: {}rescale_factor must be a number, got {r}",
                    file.display(),
                    prefix
                )
            })?,
        };
        let cfg = ImageProcessorConfig {
            shortest_edge,
            resize_to,
            crop_h,
            crop_w,
            do_resize: p.bool("do_resize", d.do_resize)?,
            do_center_crop: p.bool("do_center_crop", d.do_center_crop)?,
            do_rescale: p.bool("do_rescale", d.do_rescale)?,
            do_normalize: p.bool("do_normalize", d.do_normalize)?,
            rescale_factor,
            mean: p.triple("image_mean", d.mean)?,
            std: p.triple("image_std", d.std)?,
            resample,
            do_convert_rgb: p.bool("do_convert_rgb", d.do_convert_rgb)?,
        };
        Ok(cfg)
    }

    /// (height, width) of the image after the resize step, for an input of
    /// `w` x `h` (transformers' `get_resize_output_image_size`).
    pub fn resized_hw(&self, w: usize, h: usize) -> (usize, usize) {
        if !self.do_resize {
            return (h, w);
        }
        if let Some(hw) = self.resize_to {
            return hw;
        }
        shortest_edge_hw(w, h, self.shortest_edge)
    }

    /// (height, width) of [`preprocess`]'s output for an input of `w` x `h`.
    pub fn output_hw(&self, w: usize, h: usize) -> (usize, usize) {
        if self.do_center_crop {
            (self.crop_h, self.crop_w)
        } else {
            self.resized_hw(w, h)
        }
    }
}

fn read_json(path: &Path) -> Result<Value> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("parsing {} as JSON", path.display()))
}

/// Largest accepted side in a processor config (`size`, `crop_size`): far
/// above any real processor, small enough that no size arithmetic overflows.
pub const MAX_SIDE: usize = 1 << 16;

/// Largest image the resize step makes, in pixels. A very elongated picture
/// resized to a shortest edge would otherwise ask for gigabytes (a 1x100000
/// strip at shortest_edge 224 becomes 224x22400000); it is refused (and so
/// skipped by the loader) instead.
pub const MAX_RESIZED_PIXELS: usize = 1 << 27;

enum Size {
    Shortest(usize),
    Exact(usize, usize),
}

struct Parser<'a> {
    obj: &'a Map<String, Value>,
    file: &'a Path,
    prefix: &'a str,
}

impl Parser<'_> {
    fn get(&self, key: &str) -> Option<&Value> {
        self.obj.get(key).filter(|v| !v.is_null())
    }

    fn err(&self, key: &str, want: &str, got: &Value) -> anyhow::Error {
        anyhow::anyhow!(
            "{}: {}{key} must be {want}, got {got}",
            self.file.display(),
            self.prefix
        )
    }

    fn bool(&self, key: &str, default: bool) -> Result<bool> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => v.as_bool().ok_or_else(|| self.err(key, "true or false", v)),
        }
    }

    fn dim(&self, key: &str, v: &Value) -> Result<usize> {
        match v.as_u64() {
            Some(n) if n > 0 && n <= MAX_SIDE as u64 => Ok(n as usize),
            _ => Err(self.err(key, &format!("a positive integer at most {MAX_SIDE}"), v)),
        }
    }

    /// `[a, b, c]` or one number for all three channels.
    fn triple(&self, key: &str, default: [f32; 3]) -> Result<[f32; 3]> {
        let Some(v) = self.get(key) else {
            return Ok(default);
        };
        // Finite f32s; a std of 0 would divide every pixel by zero.
        let nonzero = key == "image_std";
        let want = if nonzero {
            "a list of 3 non-zero finite numbers (or one number)"
        } else {
            "a list of 3 finite numbers (or one number)"
        };
        let ok = |x: f32| x.is_finite() && !(nonzero && x == 0.0);
        if let Some(x) = v.as_f64() {
            let x = x as f32;
            return if ok(x) {
                Ok([x; 3])
            } else {
                Err(self.err(key, want, v))
            };
        }
        let arr = v.as_array().ok_or_else(|| self.err(key, want, v))?;
        if arr.len() != 3 {
            return Err(self.err(key, want, v));
        }
        let mut out = [0f32; 3];
        for (o, x) in out.iter_mut().zip(arr) {
            // Python floats become float32 as numpy's np.array(..., float32) does.
            *o = x.as_f64().ok_or_else(|| self.err(key, want, v))? as f32;
            if !ok(*o) {
                return Err(self.err(key, want, v));
            }
        }
        Ok(out)
    }

    /// transformers' `get_size_dict`: an int is square or a short side
    /// depending on `default_to_square`; a list is (height, width).
    fn size(&self, key: &str, default_to_square: bool) -> Result<Option<Size>> {
        let Some(v) = self.get(key) else {
            return Ok(None);
        };
        let want =
            "an int, [height, width], {\"shortest_edge\": N} or {\"height\": H, \"width\": W}";
        if v.is_number() {
            let n = self.dim(key, v)?;
            return Ok(Some(if default_to_square {
                Size::Exact(n, n)
            } else {
                Size::Shortest(n)
            }));
        }
        if let Some(arr) = v.as_array() {
            return match arr.as_slice() {
                [h, w] => Ok(Some(Size::Exact(self.dim(key, h)?, self.dim(key, w)?))),
                [n] => {
                    let n = self.dim(key, n)?;
                    Ok(Some(if default_to_square {
                        Size::Exact(n, n)
                    } else {
                        Size::Shortest(n)
                    }))
                }
                _ => Err(self.err(key, want, v)),
            };
        }
        let d = v.as_object().ok_or_else(|| self.err(key, want, v))?;
        let field = |k: &str| d.get(k).filter(|x| !x.is_null());
        let known = [
            "shortest_edge",
            "longest_edge",
            "height",
            "width",
            "max_height",
            "max_width",
        ];
        if let Some(k) = d.keys().find(|k| !known.contains(&k.as_str())) {
            bail!(
                "{}: {}{key} has an unknown key {k:?}; {key} must be {want}",
                self.file.display(),
                self.prefix
            );
        }
        for k in ["longest_edge", "max_height", "max_width"] {
            if field(k).is_some() {
                bail!(
                    "{}: {}{key}.{k} is not supported (only shortest_edge, or height and width)",
                    self.file.display(),
                    self.prefix
                );
            }
        }
        match (field("shortest_edge"), field("height"), field("width")) {
            (Some(s), None, None) => Ok(Some(Size::Shortest(
                self.dim(&format!("{key}.shortest_edge"), s)?,
            ))),
            (None, Some(h), Some(w)) => Ok(Some(Size::Exact(
                self.dim(&format!("{key}.height"), h)?,
                self.dim(&format!("{key}.width"), w)?,
            ))),
            _ => Err(self.err(key, want, v)),
        }
    }
}

/// Open an image file as `PIL.Image.open` would hand it to the processor:
/// pixels as stored (no EXIF rotation), alpha kept (the processor composites
/// it onto white). The format is detected from the content, not the name.
/// JPEGs go through [`crate::data::jpeg`], which matches PIL's libjpeg-turbo
/// decode exactly; the few JPEG kinds it does not handle (arithmetic coding,
/// 12-bit, CMYK) and all other formats use the `image` crate.
pub fn load_image(path: &Path) -> Result<DynamicImage> {
    let bytes = std::fs::read(path).with_context(|| format!("reading image {}", path.display()))?;
    decode_image(&bytes).with_context(|| format!("decoding image {}", path.display()))
}

/// [`load_image`] on bytes already in memory.
pub fn decode_image(bytes: &[u8]) -> Result<DynamicImage> {
    let format = image::guess_format(bytes).context("unrecognized image format")?;
    if format == ImageFormat::Jpeg {
        if let Ok(img) = crate::data::jpeg::decode(bytes) {
            return Ok(img);
        }
    }
    Ok(ImageReader::with_format(Cursor::new(bytes), format).decode()?)
}

/// PIL's `Image.alpha_composite(white, px)` for one channel (uint8 math of
/// libImaging/AlphaComposite.c with an opaque white destination).
#[inline]
fn over_white(c: u8, a: u8) -> u8 {
    if a == 0 {
        return 255;
    }
    const PREC: u32 = 7;
    let (c, a) = (c as u32, a as u32);
    let blend = 255 * (255 - a); // dst alpha 255
    let outa255 = a * 255 + blend;
    let coef1 = a * 255 * 255 * (1 << PREC) / outa255;
    let coef2 = 255 * (1 << PREC) - coef1;
    let tmp = c * coef1 + 255 * coef2 + (0x80 << PREC);
    ((((tmp >> 8) + tmp) >> 8) >> PREC) as u8
}

/// transformers' `convert_to_rgb` (PIL): alpha composited onto white, grey
/// replicated. 16-bit images are first reduced the way Pillow opens them
/// (high byte for RGB(A)/LA, clamp to 255 for single-channel `I;16`).
pub fn to_rgb(img: &DynamicImage) -> RgbImage {
    to_rgb_with(img, over_white)
}

fn to_rgb_with(img: &DynamicImage, blend: impl Fn(u8, u8) -> u8) -> RgbImage {
    let (w, h) = (img.width(), img.height());
    let n = (w as usize) * (h as usize);
    let mut out = Vec::with_capacity(n * 3);
    match img {
        DynamicImage::ImageRgb8(im) => return im.clone(),
        DynamicImage::ImageLuma8(im) => {
            for &v in im.as_raw() {
                out.extend_from_slice(&[v, v, v]);
            }
        }
        DynamicImage::ImageLumaA8(im) => {
            for p in im.as_raw().chunks_exact(2) {
                let v = blend(p[0], p[1]);
                out.extend_from_slice(&[v, v, v]);
            }
        }
        DynamicImage::ImageRgba8(im) => {
            for p in im.as_raw().chunks_exact(4) {
                out.extend_from_slice(&[blend(p[0], p[3]), blend(p[1], p[3]), blend(p[2], p[3])]);
            }
        }
        DynamicImage::ImageRgb16(im) => {
            out.extend(im.as_raw().iter().map(|&v| (v >> 8) as u8));
        }
        DynamicImage::ImageRgba16(im) => {
            for p in im.as_raw().chunks_exact(4) {
                let a = (p[3] >> 8) as u8;
                for &c in &p[..3] {
                    out.push(blend((c >> 8) as u8, a));
                }
            }
        }
        DynamicImage::ImageLuma16(im) => {
            for &v in im.as_raw() {
                let v = v.min(255) as u8;
                out.extend_from_slice(&[v, v, v]);
            }
        }
        DynamicImage::ImageLumaA16(im) => {
            for p in im.as_raw().chunks_exact(2) {
                let v = blend((p[0] >> 8) as u8, (p[1] >> 8) as u8);
                out.extend_from_slice(&[v, v, v]);
            }
        }
        other => {
            // Float images have no PIL counterpart; go through 8-bit RGBA.
            for p in other.to_rgba8().as_raw().chunks_exact(4) {
                out.extend_from_slice(&[blend(p[0], p[3]), blend(p[1], p[3]), blend(p[2], p[3])]);
            }
        }
    }
    RgbImage::from_raw(w, h, out).expect("RGB buffer size")
}

/// transformers' `get_resize_output_image_size(default_to_square=False)`:
/// (height, width) with the short side `short_target` and the long side
/// `int(short_target * long / short)`.
pub fn shortest_edge_hw(w: usize, h: usize, short_target: usize) -> (usize, usize) {
    let (short, long) = if w <= h { (w, h) } else { (h, w) };
    let new_long = ((short_target * long) as f64 / short as f64) as usize;
    if w <= h {
        (new_long, short_target)
    } else {
        (short_target, new_long)
    }
}

// ---------------------------------------------------------------------------
// PIL's Image.resize (libImaging/Resample.c and Geometry.c), on 8-bit RGB.

/// Fixed-point bits of the coefficients: 32 - 8 - 2 (room for overshoot).
const PRECISION_BITS: u32 = 22;

struct Filter {
    f: fn(f64) -> f64,
    support: f64,
}

fn box_filter(x: f64) -> f64 {
    if x > -0.5 && x <= 0.5 {
        1.0
    } else {
        0.0
    }
}

fn bilinear_filter(x: f64) -> f64 {
    let x = x.abs();
    if x < 1.0 {
        1.0 - x
    } else {
        0.0
    }
}

fn hamming_filter(x: f64) -> f64 {
    let x = x.abs();
    if x == 0.0 {
        return 1.0;
    }
    if x >= 1.0 {
        return 0.0;
    }
    let x = x * std::f64::consts::PI;
    // 0.54f and 0.46f are float literals in the C source.
    x.sin() / x * (0.54f32 as f64 + 0.46f32 as f64 * x.cos())
}

fn bicubic_filter(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        return ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0;
    }
    if x < 2.0 {
        return (((x - 5.0) * x + 8.0) * x - 4.0) * A;
    }
    0.0
}

fn sinc_filter(x: f64) -> f64 {
    if x == 0.0 {
        return 1.0;
    }
    let x = x * std::f64::consts::PI;
    x.sin() / x
}

fn lanczos_filter(x: f64) -> f64 {
    if (-3.0..3.0).contains(&x) {
        sinc_filter(x) * sinc_filter(x / 3.0)
    } else {
        0.0
    }
}

fn filter_for(code: u32) -> Result<Filter> {
    Ok(match code {
        resample::BOX => Filter {
            f: box_filter,
            support: 0.5,
        },
        resample::BILINEAR => Filter {
            f: bilinear_filter,
            support: 1.0,
        },
        resample::HAMMING => Filter {
            f: hamming_filter,
            support: 1.0,
        },
        resample::BICUBIC => Filter {
            f: bicubic_filter,
            support: 2.0,
        },
        resample::LANCZOS => Filter {
            f: lanczos_filter,
            support: 3.0,
        },
        _ => bail!("unsupported PIL resampling filter code {code}"),
    })
}

/// One pass's taps: output i reads `count` inputs from `start` with the
/// fixed-point weights `k[i * ksize ..][.. count]`.
struct Coeffs {
    ksize: usize,
    bounds: Vec<(usize, usize)>,
    k: Vec<i32>,
}

/// `precompute_coeffs` + `normalize_coeffs_8bpc`, same operation order.
fn precompute_coeffs(in_size: usize, out_size: usize, filter: &Filter) -> Coeffs {
    // The box is (0, in_size) as C floats.
    let (in0, in1) = (0f32, in_size as f32);
    let scale = (in1 - in0) as f64 / out_size as f64;
    let filterscale = if scale < 1.0 { 1.0 } else { scale };
    let support = filter.support * filterscale;
    let ksize = support.ceil() as usize * 2 + 1;
    let mut bounds = Vec::with_capacity(out_size);
    let mut k = vec![0i32; out_size * ksize];
    let mut w = vec![0f64; ksize];
    for xx in 0..out_size {
        let center = in0 as f64 + (xx as f64 + 0.5) * scale;
        let ss = 1.0 / filterscale;
        // C's (int) cast truncates toward zero, as `as` does.
        let xmin = ((center - support + 0.5) as i64).max(0);
        let xmax = ((center + support + 0.5) as i64).min(in_size as i64) - xmin;
        let n = xmax.max(0) as usize;
        let mut ww = 0.0;
        for (x, wx) in w.iter_mut().enumerate().take(n) {
            let v = (filter.f)(((x as i64 + xmin) as f64 - center + 0.5) * ss);
            *wx = v;
            ww += v;
        }
        let row = &mut k[xx * ksize..xx * ksize + ksize];
        for x in 0..n {
            let mut v = w[x];
            if ww != 0.0 {
                v /= ww;
            }
            let scaled = v * (1u32 << PRECISION_BITS) as f64;
            row[x] = if v < 0.0 {
                (-0.5 + scaled) as i32
            } else {
                (0.5 + scaled) as i32
            };
        }
        bounds.push((xmin as usize, n));
    }
    Coeffs { ksize, bounds, k }
}

#[inline]
fn clip8(v: i32) -> u8 {
    (v >> PRECISION_BITS).clamp(0, 255) as u8
}

const HALF: i32 = 1 << (PRECISION_BITS - 1);

fn resample_horizontal(src: &[u8], in_w: usize, h: usize, c: &Coeffs) -> Vec<u8> {
    let out_w = c.bounds.len();
    let mut out = vec![0u8; out_w * h * 3];
    for y in 0..h {
        let row = &src[y * in_w * 3..(y + 1) * in_w * 3];
        let orow = &mut out[y * out_w * 3..(y + 1) * out_w * 3];
        for (xx, &(xmin, n)) in c.bounds.iter().enumerate() {
            let k = &c.k[xx * c.ksize..xx * c.ksize + n];
            let (mut s0, mut s1, mut s2) = (HALF, HALF, HALF);
            for (x, &kx) in k.iter().enumerate() {
                let p = &row[(xmin + x) * 3..(xmin + x) * 3 + 3];
                s0 += p[0] as i32 * kx;
                s1 += p[1] as i32 * kx;
                s2 += p[2] as i32 * kx;
            }
            orow[xx * 3] = clip8(s0);
            orow[xx * 3 + 1] = clip8(s1);
            orow[xx * 3 + 2] = clip8(s2);
        }
    }
    out
}

fn resample_vertical(src: &[u8], w: usize, c: &Coeffs) -> Vec<u8> {
    let out_h = c.bounds.len();
    let stride = w * 3;
    let mut out = vec![0u8; out_h * stride];
    let mut acc = vec![0i32; stride];
    for (yy, &(ymin, n)) in c.bounds.iter().enumerate() {
        let k = &c.k[yy * c.ksize..yy * c.ksize + n];
        acc.fill(HALF);
        // Same sums as PIL's per-pixel loop (integer adds are exact), in
        // row order for cache friendliness.
        for (y, &ky) in k.iter().enumerate() {
            let row = &src[(ymin + y) * stride..(ymin + y + 1) * stride];
            for (a, &p) in acc.iter_mut().zip(row) {
                *a += p as i32 * ky;
            }
        }
        for (o, &a) in out[yy * stride..(yy + 1) * stride].iter_mut().zip(&acc) {
            *o = clip8(a);
        }
    }
    out
}

/// PIL's nearest-neighbour resize (`ImagingScaleAffine`): source coordinate
/// accumulated in f64 from half a step, then truncated.
fn resize_nearest(src: &RgbImage, out_w: usize, out_h: usize) -> RgbImage {
    let (in_w, in_h) = (src.width() as usize, src.height() as usize);
    let ax = (in_w as f32 - 0f32) as f64 / out_w as f64;
    let ay = (in_h as f32 - 0f32) as f64 / out_h as f64;
    let coord = |v: f64| if v < 0.0 { -1 } else { v as i64 };
    let mut xin = Vec::with_capacity(out_w);
    let mut xo = ax * 0.5;
    for _ in 0..out_w {
        xin.push(coord(xo));
        xo += ax;
    }
    let raw = src.as_raw();
    let mut out = vec![0u8; out_w * out_h * 3];
    let mut yo = ay * 0.5;
    for y in 0..out_h {
        let yi = coord(yo);
        yo += ay;
        if yi < 0 || yi >= in_h as i64 {
            continue;
        }
        for (x, &xi) in xin.iter().enumerate() {
            if xi >= 0 && xi < in_w as i64 {
                let s = (yi as usize * in_w + xi as usize) * 3;
                out[(y * out_w + x) * 3..(y * out_w + x) * 3 + 3].copy_from_slice(&raw[s..s + 3]);
            }
        }
    }
    RgbImage::from_raw(out_w as u32, out_h as u32, out).expect("RGB buffer size")
}

/// PIL's `Image.resize((out_w, out_h), resample)` of an RGB image.
pub fn resize(src: &RgbImage, out_w: usize, out_h: usize, resample_code: u32) -> Result<RgbImage> {
    let (in_w, in_h) = (src.width() as usize, src.height() as usize);
    ensure!(out_w > 0 && out_h > 0, "cannot resize to {out_w}x{out_h}");
    ensure!(
        in_w > 0 && in_h > 0,
        "cannot resize an empty {in_w}x{in_h} image"
    );
    if (in_w, in_h) == (out_w, out_h) {
        return Ok(src.clone());
    }
    if resample_code == resample::NEAREST {
        return Ok(resize_nearest(src, out_w, out_h));
    }
    let filter = filter_for(resample_code)?;
    // Each pass only when that side changes. Horizontal first, except that
    // Pillow 13 runs the vertical pass first when it shrinks and the
    // horizontal one grows (found by testing; the order changes the u8
    // rounding between passes).
    let mut data = std::borrow::Cow::Borrowed(src.as_raw().as_slice());
    let vertical_first = out_w > in_w && out_h < in_h;
    if vertical_first {
        let c = precompute_coeffs(in_h, out_h, &filter);
        data = resample_vertical(&data, in_w, &c).into();
    }
    if out_w != in_w {
        let c = precompute_coeffs(in_w, out_w, &filter);
        let rows = if vertical_first { out_h } else { in_h };
        data = resample_horizontal(&data, in_w, rows, &c).into();
    }
    if out_h != in_h && !vertical_first {
        let c = precompute_coeffs(in_h, out_h, &filter);
        data = resample_vertical(&data, out_w, &c).into();
    }
    Ok(RgbImage::from_raw(out_w as u32, out_h as u32, data.into_owned()).expect("RGB buffer size"))
}

/// transformers' numpy `center_crop`: offsets `(h - crop_h) // 2` and
/// `(w - crop_w) // 2`; a side smaller than the crop is zero-padded with the
/// image placed at `ceil((crop - size) / 2)`.
pub fn center_crop(src: &RgbImage, crop_h: usize, crop_w: usize) -> RgbImage {
    let (w, h) = (src.width() as i64, src.height() as i64);
    let (ch, cw) = (crop_h as i64, crop_w as i64);
    // Python's // floors, also for negative numerators. With padding,
    // transformers shifts both the image and the window by the same
    // ceil(pad / 2), so output (y, x) always reads source (top + y, left + x).
    let top = (h - ch).div_euclid(2);
    let left = (w - cw).div_euclid(2);
    let raw = src.as_raw();
    let mut out = vec![0u8; crop_h * crop_w * 3];
    for y in 0..ch {
        let sy = top + y;
        if sy < 0 || sy >= h {
            continue;
        }
        for x in 0..cw {
            let sx = left + x;
            if sx < 0 || sx >= w {
                continue;
            }
            let s = ((sy * w + sx) * 3) as usize;
            let d = ((y * cw + x) * 3) as usize;
            out[d..d + 3].copy_from_slice(&raw[s..s + 3]);
        }
    }
    RgbImage::from_raw(crop_w as u32, crop_h as u32, out).expect("RGB buffer size")
}

/// Steps 1-3 (RGB conversion, resize, center crop): the u8 pixels the
/// processor rescales and normalizes.
pub fn resize_and_crop(img: &DynamicImage, cfg: &ImageProcessorConfig) -> Result<RgbImage> {
    let rgb = if cfg.do_convert_rgb {
        to_rgb(img)
    } else {
        match img {
            DynamicImage::ImageRgb8(im) => im.clone(),
            other => bail!(
                "do_convert_rgb is false but the image is {:?}, not 8-bit RGB (transformers would \
                 fail on its channel count)",
                other.color()
            ),
        }
    };
    let rgb = if cfg.do_resize {
        let (iw, ih) = (rgb.width() as usize, rgb.height() as usize);
        let (h, w) = cfg.resized_hw(iw, ih);
        ensure!(
            h.checked_mul(w).is_some_and(|n| n <= MAX_RESIZED_PIXELS)
                && h <= u32::MAX as usize
                && w <= u32::MAX as usize,
            "a {iw}x{ih} picture would be resized to {w}x{h}, more than {MAX_RESIZED_PIXELS} \
             pixels (too elongated)"
        );
        resize(&rgb, w, h, cfg.resample)?
    } else {
        rgb
    };
    Ok(if cfg.do_center_crop {
        center_crop(&rgb, cfg.crop_h, cfg.crop_w)
    } else {
        rgb
    })
}

/// Step 4 on u8 RGB pixels (HWC): CHW f32, `x * rescale_factor` in f64 cast
/// to f32, then `(x - mean) / std` in f32, as transformers' numpy code does.
pub fn rescale_normalize(rgb: &RgbImage, cfg: &ImageProcessorConfig) -> Vec<f32> {
    let (w, h) = (rgb.width() as usize, rgb.height() as usize);
    let raw = rgb.as_raw();
    let mut out = vec![0f32; 3 * h * w];
    for c in 0..3 {
        let plane = &mut out[c * h * w..(c + 1) * h * w];
        for (i, o) in plane.iter_mut().enumerate() {
            let u = raw[i * 3 + c];
            let mut x = if cfg.do_rescale {
                (u as f64 * cfg.rescale_factor) as f32
            } else {
                u as f32
            };
            if cfg.do_normalize {
                x = (x - cfg.mean[c]) / cfg.std[c];
            }
            *o = x;
        }
    }
    out
}

/// The whole processor: CHW f32 `pixel_values` of one image, shape
/// [3, crop_h, crop_w] (or [3, H, W] of the resized image when
/// `do_center_crop` is false; see [`ImageProcessorConfig::output_hw`]).
pub fn preprocess(img: &DynamicImage, cfg: &ImageProcessorConfig) -> Result<Vec<f32>> {
    let rgb = resize_and_crop(img, cfg)?;
    Ok(rescale_normalize(&rgb, cfg))
}

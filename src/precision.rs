//! Training precision (`--fp16`, `--bf16`) and the host side of the two
//! 16-bit formats: round-to-nearest-even conversions that the GPU kernels
//! (shaders/convert.wgsl) and saved files (`--save_dtype`) must agree with.

use anyhow::{bail, Result};

/// How a run stores activations: f32, or one of the 16-bit formats with f32
/// arithmetic, master weights and optimizer state (PyTorch's autocast).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Precision {
    #[default]
    F32,
    F16,
    Bf16,
}

impl Precision {
    pub fn parse(s: &str) -> Result<Precision> {
        Ok(match s.to_ascii_lowercase().as_str() {
            "f32" | "fp32" | "float32" => Precision::F32,
            "f16" | "fp16" | "float16" | "half" => Precision::F16,
            "bf16" | "bfloat16" => Precision::Bf16,
            other => bail!("unknown precision {other:?} (f32, f16 or bf16)"),
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Precision::F32 => "f32",
            Precision::F16 => "f16",
            Precision::Bf16 => "bf16",
        }
    }

    pub fn is_half(self) -> bool {
        self != Precision::F32
    }

    /// `x` rounded to this format and back (f32: unchanged).
    pub fn round(self, x: f32) -> f32 {
        match self {
            Precision::F32 => x,
            Precision::F16 => f16_bits_to_f32(f32_to_f16_bits(x)),
            Precision::Bf16 => bf16_bits_to_f32(f32_to_bf16_bits(x)),
        }
    }
}

/// f32 to IEEE binary16 bits, rounding to nearest even; overflow gives
/// infinity (as a cast in PyTorch does), NaN stays NaN.
pub fn f32_to_f16_bits(x: f32) -> u16 {
    half::f16::from_f32(x).to_bits()
}

pub fn f16_bits_to_f32(h: u16) -> f32 {
    half::f16::from_bits(h).to_f32()
}

/// f32 to bfloat16 bits (the upper half of the f32), rounding to nearest
/// even; NaN stays a quiet NaN.
pub fn f32_to_bf16_bits(x: f32) -> u16 {
    half::bf16::from_f32(x).to_bits()
}

pub fn bf16_bits_to_f32(h: u16) -> f32 {
    f32::from_bits((h as u32) << 16)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounding_is_to_nearest_even() {
        // 1 + 2^-11 is halfway between f16's 1 and 1 + 2^-10: to even (1).
        assert_eq!(Precision::F16.round(1.0 + 2f32.powi(-11)), 1.0);
        assert_eq!(
            Precision::F16.round(1.0 + 3.0 * 2f32.powi(-11)),
            1.0 + 2.0 * 2f32.powi(-10)
        );
        assert_eq!(Precision::Bf16.round(1.0 + 2f32.powi(-8)), 1.0);
        assert!(Precision::F16.round(65520.0).is_infinite());
        assert_eq!(Precision::F16.round(65519.0), 65504.0);
        assert!(Precision::Bf16.round(f32::NAN).is_nan());
        assert_eq!(Precision::parse("BF16").unwrap(), Precision::Bf16);
        assert!(Precision::parse("f8").is_err());
    }
}

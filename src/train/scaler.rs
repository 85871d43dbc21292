//! Dynamic loss scaling for `--fp16`: PyTorch's `torch.amp.GradScaler`
//! (init_scale 2^16, growth_factor 2, backoff_factor 0.5, growth_interval
//! 2000). The backward is seeded with `scale` times d loss, so that small
//! gradients survive half-precision storage; the step divides it out again
//! (see `step.rs`). A step whose gradients hold inf or NaN is skipped and
//! the scale backs off; after `growth_interval` clean steps in a row it
//! grows. bf16 has f32's exponent range, so (as in PyTorch's Trainer) it
//! runs without a scaler.

use crate::precision::Precision;
use anyhow::{ensure, Context, Result};
use serde_json::{json, Value};

/// The scaler's settings and state (PyTorch's `GradScaler.state_dict()`:
/// `scale`, `growth_factor`, `backoff_factor`, `growth_interval`,
/// `_growth_tracker`), plus the steps it skipped over the run.
#[derive(Clone, Debug, PartialEq)]
pub struct GradScaler {
    /// The current scale (an f32, as PyTorch keeps it in a float tensor).
    pub scale: f32,
    pub growth_factor: f32,
    pub backoff_factor: f32,
    pub growth_interval: u32,
    /// Clean steps since the last growth or backoff.
    pub growth_tracker: u32,
    /// Optimizer steps skipped for non-finite gradients. The Trainer does
    /// not step the learning rate schedule on those, so the schedule stands
    /// this many steps behind `global_step`.
    pub skipped_steps: u64,
}

impl Default for GradScaler {
    /// PyTorch's defaults.
    fn default() -> Self {
        GradScaler::new(65536.0, 2.0, 0.5, 2000)
    }
}

impl GradScaler {
    pub fn new(
        init_scale: f32,
        growth_factor: f32,
        backoff_factor: f32,
        growth_interval: u32,
    ) -> GradScaler {
        GradScaler {
            scale: init_scale,
            growth_factor,
            backoff_factor,
            growth_interval,
            growth_tracker: 0,
            skipped_steps: 0,
        }
    }

    /// The scaler a run of `precision` uses: only f16 needs one.
    pub fn for_precision(precision: Precision) -> Option<GradScaler> {
        (precision == Precision::F16).then(GradScaler::default)
    }

    /// After a step (`_amp_update_scale_`): with `found_inf` the scale backs
    /// off and the tracker restarts; otherwise the tracker counts the step
    /// and, at `growth_interval`, the scale grows (unless that overflows to
    /// infinity) and the tracker restarts.
    pub fn update(&mut self, found_inf: bool) {
        if found_inf {
            self.scale *= self.backoff_factor;
            self.growth_tracker = 0;
            self.skipped_steps += 1;
            return;
        }
        let successful = self.growth_tracker + 1;
        if successful == self.growth_interval {
            let grown = self.scale * self.growth_factor;
            if grown.is_finite() {
                self.scale = grown;
            }
            self.growth_tracker = 0;
        } else {
            self.growth_tracker = successful;
        }
    }

    /// The state as kept in trainer_state.json (PyTorch's key names).
    pub fn to_json(&self) -> Value {
        json!({
            "scale": self.scale,
            "growth_factor": self.growth_factor,
            "backoff_factor": self.backoff_factor,
            "growth_interval": self.growth_interval,
            "_growth_tracker": self.growth_tracker,
            "skipped_steps": self.skipped_steps,
        })
    }

    pub fn from_json(v: &Value, what: &str) -> Result<GradScaler> {
        let num = |k: &str| {
            v[k].as_f64()
                .with_context(|| format!("{what}: grad_scaler.{k} is missing or not a number"))
        };
        let int = |k: &str| {
            v[k].as_u64().with_context(|| {
                format!("{what}: grad_scaler.{k} is missing or not a whole number")
            })
        };
        let s = GradScaler {
            scale: num("scale")? as f32,
            growth_factor: num("growth_factor")? as f32,
            backoff_factor: num("backoff_factor")? as f32,
            growth_interval: int("growth_interval")? as u32,
            growth_tracker: int("_growth_tracker")? as u32,
            skipped_steps: int("skipped_steps")?,
        };
        ensure!(
            s.scale.is_finite() && s.scale > 0.0,
            "{what}: grad_scaler.scale {} is not a positive finite number",
            s.scale
        );
        Ok(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backs_off_grows_and_round_trips() {
        let mut s = GradScaler::new(8.0, 2.0, 0.5, 2);
        s.update(true);
        assert_eq!((s.scale, s.growth_tracker, s.skipped_steps), (4.0, 0, 1));
        s.update(false);
        assert_eq!((s.scale, s.growth_tracker), (4.0, 1));
        s.update(false);
        assert_eq!((s.scale, s.growth_tracker), (8.0, 0));
        // Growth that would overflow keeps the scale.
        let mut big = GradScaler::new(f32::MAX, 2.0, 0.5, 1);
        big.update(false);
        assert_eq!(big.scale, f32::MAX);
        let back = GradScaler::from_json(&s.to_json(), "test").unwrap();
        assert_eq!(back, s);
        assert!(GradScaler::for_precision(Precision::Bf16).is_none());
        assert_eq!(
            GradScaler::for_precision(Precision::F16),
            Some(GradScaler::new(65536.0, 2.0, 0.5, 2000))
        );
    }
}

//! Learning rate per optimizer step, exactly as `transformers.get_scheduler`
//! builds it: a `torch.optim.lr_scheduler.LambdaLR` whose multiplier
//! functions are transformers' `_get_*_lr_lambda`, evaluated in f64 with the
//! same operations in the same order, so the values match Python's bit for bit
//! (checked against `tests/fixtures/schedule/*.json`).
//!
//! Step convention: [`Schedule::lr_at`]`(t)` is the learning rate of the
//! update that follows `t` completed updates, which is what
//! `scheduler.get_last_lr()` returns before the `t+1`-th `scheduler.step()`.
//! The Trainer (transformers 5) logs `learning_rate` at `global_step = g` as
//! the rate of the update just taken, i.e. `lr_at(g - 1)`.

use super::args::TrainArgs;
use anyhow::{bail, ensure, Result};
use std::f64::consts::PI;

/// A learning-rate schedule: base rate, warmup and total optimizer steps.
#[derive(Clone, Debug, PartialEq)]
pub enum Schedule {
    /// `constant`: `lr` throughout (no warmup, as in transformers).
    Constant { lr: f64 },
    /// `constant_with_warmup`.
    ConstantWithWarmup { lr: f64, warmup: u64 },
    /// `linear` (`get_linear_schedule_with_warmup`), the Trainer's default.
    Linear { lr: f64, warmup: u64, total: u64 },
    /// `cosine` (`num_cycles` 0.5, `min_lr_rate` 0) and `cosine_with_min_lr`
    /// (a floor at `min_lr_rate * lr`).
    Cosine {
        lr: f64,
        warmup: u64,
        total: u64,
        num_cycles: f64,
        min_lr_rate: f64,
    },
    /// `cosine_with_restarts` (`num_cycles` 1 by default).
    CosineWithRestarts {
        lr: f64,
        warmup: u64,
        total: u64,
        num_cycles: f64,
    },
    /// `polynomial` (`lr_end` 1e-7, `power` 1 by default).
    Polynomial {
        lr: f64,
        warmup: u64,
        total: u64,
        lr_end: f64,
        power: f64,
    },
    /// `inverse_sqrt` (`timescale` defaults to the warmup, or 10000).
    InverseSqrt {
        lr: f64,
        warmup: u64,
        timescale: u64,
    },
}

/// The `--lr_scheduler_type` names this crate implements.
pub const SCHEDULER_TYPES: &[&str] = &[
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "constant",
    "constant_with_warmup",
    "inverse_sqrt",
    "cosine_with_min_lr",
];

/// transformers' scheduler names that need something this crate does not
/// have (a metric to watch, extra phases).
const UNSUPPORTED_TYPES: &[&str] = &[
    "reduce_lr_on_plateau",
    "cosine_warmup_with_min_lr",
    "warmup_stable_decay",
    "greedy",
];

fn kw_f64(kwargs: &serde_json::Map<String, serde_json::Value>, key: &str) -> Result<Option<f64>> {
    match kwargs.get(key) {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(v) => match v.as_f64() {
            Some(x) if x.is_finite() => Ok(Some(x)),
            _ => bail!("--lr_scheduler_kwargs: {key} must be a finite number, got {v}"),
        },
    }
}

impl Schedule {
    /// The schedule `transformers.get_scheduler(name, ...)` builds for an
    /// optimizer whose lr is `lr`, with the scheduler's default parameters.
    pub fn new(name: &str, lr: f64, warmup: u64, total: u64) -> Result<Schedule> {
        Schedule::with_kwargs(name, lr, warmup, total, &serde_json::Map::new())
    }

    /// [`Schedule::new`] with `--lr_scheduler_kwargs`
    /// (`scheduler_specific_kwargs`): `num_cycles`, `lr_end`, `power`,
    /// `timescale`, `min_lr`, `min_lr_rate`, each only where transformers'
    /// scheduler takes it.
    pub fn with_kwargs(
        name: &str,
        lr: f64,
        warmup: u64,
        total: u64,
        kwargs: &serde_json::Map<String, serde_json::Value>,
    ) -> Result<Schedule> {
        ensure!(
            lr.is_finite() && lr >= 0.0,
            "learning rate must be finite and >= 0, got {lr}"
        );
        let allowed: &[&str] = match name {
            "linear" | "constant" | "constant_with_warmup" => &[],
            "cosine" | "cosine_with_restarts" => &["num_cycles"],
            "cosine_with_min_lr" => &["num_cycles", "min_lr", "min_lr_rate"],
            "polynomial" => &["lr_end", "power"],
            "inverse_sqrt" => &["timescale"],
            n if UNSUPPORTED_TYPES.contains(&n) => bail!(
                "--lr_scheduler_type {n} is not supported here; use one of {}",
                SCHEDULER_TYPES.join(", ")
            ),
            n => bail!(
                "--lr_scheduler_type: unknown scheduler '{n}'; use one of {}",
                SCHEDULER_TYPES.join(", ")
            ),
        };
        for k in kwargs.keys() {
            ensure!(
                allowed.contains(&k.as_str()),
                "--lr_scheduler_kwargs: '{k}' is not a parameter of the {name} scheduler{}",
                if allowed.is_empty() {
                    " (it takes none)".to_string()
                } else {
                    format!(" (it takes {})", allowed.join(", "))
                }
            );
        }
        Ok(match name {
            "constant" => Schedule::Constant { lr },
            "constant_with_warmup" => Schedule::ConstantWithWarmup { lr, warmup },
            "linear" => Schedule::Linear { lr, warmup, total },
            "cosine" => Schedule::Cosine {
                lr,
                warmup,
                total,
                num_cycles: kw_f64(kwargs, "num_cycles")?.unwrap_or(0.5),
                min_lr_rate: 0.0,
            },
            "cosine_with_min_lr" => {
                let min_lr_rate = match (kw_f64(kwargs, "min_lr")?, kw_f64(kwargs, "min_lr_rate")?) {
                    (Some(_), Some(_)) => bail!("--lr_scheduler_kwargs: only one of min_lr or min_lr_rate should be set"),
                    (Some(m), None) => {
                        ensure!(lr > 0.0, "--lr_scheduler_kwargs min_lr needs a learning rate above 0");
                        m / lr
                    }
                    (None, Some(r)) => r,
                    (None, None) => bail!(
                        "--lr_scheduler_type cosine_with_min_lr needs min_lr or min_lr_rate in --lr_scheduler_kwargs, \
                         e.g. --lr_scheduler_kwargs '{{\"min_lr_rate\": 0.1}}'"
                    ),
                };
                Schedule::Cosine {
                    lr,
                    warmup,
                    total,
                    num_cycles: kw_f64(kwargs, "num_cycles")?.unwrap_or(0.5),
                    min_lr_rate,
                }
            }
            "cosine_with_restarts" => Schedule::CosineWithRestarts {
                lr,
                warmup,
                total,
                num_cycles: kw_f64(kwargs, "num_cycles")?.unwrap_or(1.0),
            },
            "polynomial" => {
                let lr_end = kw_f64(kwargs, "lr_end")?.unwrap_or(1e-7);
                ensure!(
                    lr > lr_end,
                    "--lr_scheduler_type polynomial: lr_end ({lr_end}) must be smaller than the learning rate ({lr})"
                );
                Schedule::Polynomial {
                    lr,
                    warmup,
                    total,
                    lr_end,
                    power: kw_f64(kwargs, "power")?.unwrap_or(1.0),
                }
            }
            "inverse_sqrt" => {
                let timescale = match kw_f64(kwargs, "timescale")? {
                    Some(t) => {
                        ensure!(
                            t >= 1.0 && t.fract() == 0.0,
                            "--lr_scheduler_kwargs: timescale must be a positive integer, got {t}"
                        );
                        t as u64
                    }
                    None if warmup > 0 => warmup,
                    None => 10_000,
                };
                Schedule::InverseSqrt {
                    lr,
                    warmup,
                    timescale,
                }
            }
            _ => unreachable!(),
        })
    }

    /// The Trainer's scheduler for a run of `total` optimizer steps:
    /// `--lr_scheduler_type`, `--learning_rate`, `--lr_scheduler_kwargs`, and
    /// the warmup from [`TrainArgs::warmup_steps_for`].
    pub fn from_args(args: &TrainArgs, total: usize) -> Result<Schedule> {
        Schedule::with_kwargs(
            &args.lr_scheduler_type,
            args.learning_rate,
            args.warmup_steps_for(total) as u64,
            total as u64,
            &args.lr_scheduler_kwargs,
        )
    }

    /// The `--lr_scheduler_type` name (`cosine_with_min_lr` reads back as
    /// `cosine` when its floor is 0, which is the same schedule).
    pub fn name(&self) -> &'static str {
        match self {
            Schedule::Constant { .. } => "constant",
            Schedule::ConstantWithWarmup { .. } => "constant_with_warmup",
            Schedule::Linear { .. } => "linear",
            Schedule::Cosine { min_lr_rate, .. } if *min_lr_rate != 0.0 => "cosine_with_min_lr",
            Schedule::Cosine { .. } => "cosine",
            Schedule::CosineWithRestarts { .. } => "cosine_with_restarts",
            Schedule::Polynomial { .. } => "polynomial",
            Schedule::InverseSqrt { .. } => "inverse_sqrt",
        }
    }

    /// Scheduler state after `step` updates, for checkpoints: the fields of
    /// torch's `LambdaLR.state_dict()` (`base_lrs`, `last_epoch`,
    /// `_step_count`, `_last_lr`) plus the schedule's own parameters (`name`,
    /// `num_warmup_steps`, `num_training_steps`, and `num_cycles`,
    /// `min_lr_rate`, `lr_end`, `power`, `timescale` where they apply).
    pub fn to_json(&self, step: u64) -> serde_json::Value {
        let mut m = serde_json::Map::new();
        m.insert("name".into(), self.name().into());
        m.insert("base_lrs".into(), serde_json::json!([self.base_lr()]));
        m.insert("last_epoch".into(), step.into());
        m.insert("_step_count".into(), (step + 1).into());
        m.insert("_last_lr".into(), serde_json::json!([self.lr_at(step)]));
        let (warmup, total) = match *self {
            Schedule::Constant { .. } => (None, None),
            Schedule::ConstantWithWarmup { warmup, .. } | Schedule::InverseSqrt { warmup, .. } => {
                (Some(warmup), None)
            }
            Schedule::Linear { warmup, total, .. }
            | Schedule::Cosine { warmup, total, .. }
            | Schedule::CosineWithRestarts { warmup, total, .. }
            | Schedule::Polynomial { warmup, total, .. } => (Some(warmup), Some(total)),
        };
        if let Some(w) = warmup {
            m.insert("num_warmup_steps".into(), w.into());
        }
        if let Some(t) = total {
            m.insert("num_training_steps".into(), t.into());
        }
        match *self {
            Schedule::Cosine {
                num_cycles,
                min_lr_rate,
                ..
            } => {
                m.insert("num_cycles".into(), num_cycles.into());
                m.insert("min_lr_rate".into(), min_lr_rate.into());
            }
            Schedule::CosineWithRestarts { num_cycles, .. } => {
                m.insert("num_cycles".into(), num_cycles.into());
            }
            Schedule::Polynomial { lr_end, power, .. } => {
                m.insert("lr_end".into(), lr_end.into());
                m.insert("power".into(), power.into());
            }
            Schedule::InverseSqrt { timescale, .. } => {
                m.insert("timescale".into(), timescale.into());
            }
            _ => {}
        }
        serde_json::Value::Object(m)
    }

    /// The base learning rate (`--learning_rate`).
    pub fn base_lr(&self) -> f64 {
        match *self {
            Schedule::Constant { lr }
            | Schedule::ConstantWithWarmup { lr, .. }
            | Schedule::Linear { lr, .. }
            | Schedule::Cosine { lr, .. }
            | Schedule::CosineWithRestarts { lr, .. }
            | Schedule::Polynomial { lr, .. }
            | Schedule::InverseSqrt { lr, .. } => lr,
        }
    }

    /// The LambdaLR multiplier after `step` completed updates.
    pub fn multiplier(&self, step: u64) -> f64 {
        // Python evaluates these on ints converted with float(); u64 -> f64
        // is exact below 2^53.
        let s = step as f64;
        let warm = |w: u64| s / (w.max(1) as f64);
        match *self {
            Schedule::Constant { .. } => 1.0,
            Schedule::ConstantWithWarmup { warmup, .. } => {
                if step < warmup {
                    warm(warmup)
                } else {
                    1.0
                }
            }
            Schedule::Linear { warmup, total, .. } => {
                if step < warmup {
                    return warm(warmup);
                }
                let num = total as f64 - s;
                let den = (total as i128 - warmup as i128).max(1) as f64;
                (num / den).max(0.0)
            }
            Schedule::Cosine {
                warmup,
                total,
                num_cycles,
                min_lr_rate,
                ..
            } => {
                if step < warmup {
                    return warm(warmup);
                }
                let progress =
                    (s - warmup as f64) / ((total as i128 - warmup as i128).max(1) as f64);
                let factor = 0.5 * (1.0 + (PI * num_cycles * 2.0 * progress).cos());
                let factor = factor * (1.0 - min_lr_rate) + min_lr_rate;
                factor.max(0.0)
            }
            Schedule::CosineWithRestarts {
                warmup,
                total,
                num_cycles,
                ..
            } => {
                if step < warmup {
                    return warm(warmup);
                }
                let progress =
                    (s - warmup as f64) / ((total as i128 - warmup as i128).max(1) as f64);
                if progress >= 1.0 {
                    return 0.0;
                }
                // Python's float % is floored; progress >= 0 here, so it
                // agrees with Rust's rem_euclid.
                (0.5 * (1.0 + (PI * (num_cycles * progress).rem_euclid(1.0)).cos())).max(0.0)
            }
            Schedule::Polynomial {
                lr,
                warmup,
                total,
                lr_end,
                power,
            } => {
                if step < warmup {
                    return warm(warmup);
                }
                if step > total {
                    return lr_end / lr;
                }
                let decay_steps = total - warmup;
                if decay_steps == 0 {
                    // Python divides by zero here; the end rate is the
                    // only sensible value.
                    return lr_end / lr;
                }
                let lr_range = lr - lr_end;
                let pct_remaining = 1.0 - (s - warmup as f64) / decay_steps as f64;
                let decay = lr_range * pct_remaining.powf(power) + lr_end;
                decay / lr
            }
            Schedule::InverseSqrt {
                warmup, timescale, ..
            } => {
                if step < warmup {
                    return warm(warmup);
                }
                let shift = timescale as f64 - warmup as f64;
                1.0 / ((s + shift) / timescale as f64).sqrt()
            }
        }
    }

    /// The learning rate of the update that follows `step` completed updates
    /// (`base_lr * multiplier(step)`, as LambdaLR computes it).
    pub fn lr_at(&self, step: u64) -> f64 {
        self.base_lr() * self.multiplier(step)
    }
}

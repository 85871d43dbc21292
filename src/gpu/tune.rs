//! Kernel choices measured on this adapter (autotuning, unless the settings'
//! `tune` is off), kept in memory and in a JSON file in the user's cache
//! folder (the settings' `cache_dir`: `$CLIP_WGPU_CACHE_DIR`, else
//! `$XDG_CACHE_HOME/clip-wgpu`, else `~/.cache/clip-wgpu`) so the next run
//! skips the measuring. One file per adapter, driver and kernel source
//! version; a file that cannot be read or written only costs a re-tune.
//!
//! Also [`time`], the timer the measuring (and `bench`) runs candidates with.

use super::Gpu;
use anyhow::Result;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Instant;

pub(crate) struct TuneCache {
    /// Hash of the adapter and kernel version: the file's name.
    id: u64,
    path: Option<PathBuf>,
    map: Mutex<BTreeMap<String, String>>,
    /// Choices taken from a checkpoint: they win over the file's, so a run
    /// resumed on another machine computes with the kernels it began with.
    pinned: Mutex<BTreeMap<String, String>>,
    /// Every choice this process looked up or made (what a checkpoint records).
    used: Mutex<BTreeMap<String, String>>,
}

/// FNV-1a: a stable short hash for file names.
pub(crate) fn fnv(parts: &[&str]) -> u64 {
    let mut h = 0xcbf29ce484222325u64;
    for p in parts {
        for b in p.bytes().chain([0]) {
            h = (h ^ b as u64).wrapping_mul(0x100000001b3);
        }
    }
    h
}

impl TuneCache {
    /// The cache of `adapter` (name, driver, backend) for kernels whose
    /// sources hash to `version`, kept in folder `dir` (`None`: in memory).
    pub(crate) fn open(info: &wgpu::AdapterInfo, version: u64, dir: Option<&Path>) -> TuneCache {
        let id = fnv(&[
            &info.name,
            &info.driver,
            &info.driver_info,
            &format!("{:?}", info.backend),
            &format!("{version:x}"),
            env!("CARGO_PKG_VERSION"),
        ]);
        Self::at(id, dir)
    }

    /// This cache's file in folder `dir` instead (read from there).
    pub(crate) fn moved_to(&self, dir: Option<&Path>) -> TuneCache {
        let t = Self::at(self.id, dir);
        // Pinned and used choices belong to the run, not to the file.
        t.pin(&self.pinned.lock().unwrap());
        *t.used.lock().unwrap() = self.used();
        t
    }

    fn at(id: u64, dir: Option<&Path>) -> TuneCache {
        let path = dir.map(|d| d.join(format!("tune-{id:016x}.json")));
        let map = path
            .as_ref()
            .and_then(|p| std::fs::read_to_string(p).ok())
            .and_then(|t| serde_json::from_str::<BTreeMap<String, String>>(&t).ok())
            .unwrap_or_default();
        TuneCache {
            id,
            path,
            map: Mutex::new(map),
            pinned: Mutex::default(),
            used: Mutex::default(),
        }
    }

    pub(crate) fn get(&self, key: &str) -> Option<String> {
        let v = self.pinned.lock().unwrap().get(key).cloned();
        let v = v.or_else(|| self.map.lock().unwrap().get(key).cloned())?;
        // Looked up on every dispatch of a tuned kernel: record it once.
        let mut used = self.used.lock().unwrap();
        if used.get(key) != Some(&v) {
            used.insert(key.to_string(), v.clone());
        }
        Some(v)
    }

    /// Choices that override the file's from now on (not written to it).
    pub(crate) fn pin(&self, entries: &BTreeMap<String, String>) {
        let mut p = self.pinned.lock().unwrap();
        p.extend(entries.iter().map(|(k, v)| (k.clone(), v.clone())));
    }

    /// The choices this process has used so far.
    pub(crate) fn used(&self) -> BTreeMap<String, String> {
        self.used.lock().unwrap().clone()
    }

    /// Remember a choice and rewrite the file (atomically: temp + rename).
    pub(crate) fn set(&self, key: &str, value: &str) {
        self.used
            .lock()
            .unwrap()
            .insert(key.to_string(), value.to_string());
        let text = {
            let mut m = self.map.lock().unwrap();
            m.insert(key.to_string(), value.to_string());
            serde_json::to_string_pretty(&*m).unwrap_or_default()
        };
        if let Some(p) = &self.path {
            let tmp = p.with_extension(format!("tmp{}", std::process::id()));
            let ok = p
                .parent()
                .is_some_and(|d| std::fs::create_dir_all(d).is_ok())
                && std::fs::write(&tmp, text).is_ok()
                && std::fs::rename(&tmp, p).is_ok();
            if !ok {
                let _ = std::fs::remove_file(&tmp);
            }
        }
    }

    pub(crate) fn path(&self) -> Option<&PathBuf> {
        self.path.as_ref()
    }
}

/// Median seconds of `reps` timed runs after one warm-up run: GPU time
/// from timestamp queries where the adapter has them, else wall time
/// around submit + wait.
pub fn time(gpu: &Gpu, reps: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    f()?;
    gpu.sync()?;
    let mut ts = Vec::with_capacity(reps);
    for _ in 0..reps {
        let t = Instant::now();
        if gpu.has_timestamps() && !gpu.profiling() {
            gpu.profile_start(true)?;
            f()?;
            let k = gpu.profile_stop()?;
            ts.push(k.iter().map(|k| k.seconds).sum());
        } else {
            f()?;
            gpu.sync()?;
            ts.push(t.elapsed().as_secs_f64());
        }
    }
    ts.sort_by(|a, b| a.total_cmp(b));
    Ok(ts[ts.len() / 2])
}

/// A kernel the tuner's self-verification rejected, reported once per
/// process (`what`, e.g. "matmul kernel vec4 16x2").
pub(crate) fn report_rejection(what: &str, key: &str, why: &str) {
    static SEEN: Mutex<Vec<String>> = Mutex::new(Vec::new());
    let mut seen = SEEN.lock().unwrap();
    if !seen.iter().any(|s| s == what) {
        seen.push(what.to_string());
        crate::stderr_line(&format!(
            "warning: {what} disagrees with the reference kernel on this adapter ({key}: {why}); \
             it is not used for such shapes"
        ));
    }
}

/// Largest |a - b| (NaN counts as infinite) and the largest |b|: how far a
/// candidate's output is from the reference's.
pub(crate) fn max_difference(a: &[f32], b: &[f32]) -> (f64, f64) {
    let err = a
        .iter()
        .zip(b)
        .map(|(x, y)| ((x - y) as f64).abs())
        .fold(
            0.0f64,
            |m, d| if d.is_nan() { f64::INFINITY } else { m.max(d) },
        );
    let scale = b.iter().fold(0.0f32, |m, v| m.max(v.abs())) as f64;
    (err, scale)
}

//! safetensors in Hugging Face layout: `model.safetensors`, or shards listed
//! by `model.safetensors.index.json`. Float tensors of any width are read as
//! f32; saving writes f32 with `{"format": "pt"}` metadata, atomically.

use anyhow::{bail, ensure, Context, Result};
use safetensors::{Dtype, SafeTensors};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

/// A tensor on the host.
#[derive(Clone, Debug, PartialEq)]
pub struct HostTensor {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

impl HostTensor {
    pub fn new(shape: &[usize], data: Vec<f32>) -> HostTensor {
        debug_assert_eq!(shape.iter().product::<usize>(), data.len());
        HostTensor {
            shape: shape.to_vec(),
            data,
        }
    }
}

/// Every tensor of a checkpoint, by name.
#[derive(Default, Debug)]
pub struct Weights {
    pub tensors: BTreeMap<String, HostTensor>,
    /// Integer tensors (e.g. `input_ids` in fixtures, old `position_ids`).
    pub ints: BTreeMap<String, (Vec<usize>, Vec<i64>)>,
}

fn f16_to_f32(h: u16) -> f32 {
    let sign = ((h >> 15) as u32) << 31;
    let exp = ((h >> 10) & 0x1f) as u32;
    let frac = (h & 0x3ff) as u32;
    let bits = match (exp, frac) {
        (0, 0) => sign,
        (0, f) => {
            // Subnormal: renormalise.
            let mut e: i32 = 1;
            let mut f = f;
            while f & 0x400 == 0 {
                f <<= 1;
                e -= 1;
            }
            sign | (((e + 127 - 15) as u32) << 23) | ((f & 0x3ff) << 13)
        }
        (31, 0) => sign | 0x7f80_0000,
        (31, f) => sign | 0x7fc0_0000 | (f << 13),
        (e, f) => sign | ((e + 127 - 15) << 23) | (f << 13),
    };
    f32::from_bits(bits)
}

impl Weights {
    /// Load `dir/model.safetensors`, or the shards of
    /// `dir/model.safetensors.index.json`.
    pub fn load_dir(dir: &Path) -> Result<Weights> {
        let single = dir.join("model.safetensors");
        let index = dir.join("model.safetensors.index.json");
        if single.is_file() {
            return Self::load_file(&single);
        }
        if index.is_file() {
            return Self::load_sharded(&index);
        }
        if dir.join("pytorch_model.bin").is_file() {
            bail!(
                "{} holds only pytorch_model.bin: clip-wgpu reads safetensors. Convert it with \
                 transformers (`model.save_pretrained(dir, safe_serialization=True)`)",
                dir.display()
            );
        }
        bail!(
            "{} has no model.safetensors or model.safetensors.index.json",
            dir.display()
        )
    }

    fn load_sharded(index: &Path) -> Result<Weights> {
        let text = std::fs::read_to_string(index)
            .with_context(|| format!("reading {}", index.display()))?;
        let v: serde_json::Value = serde_json::from_str(&text)
            .with_context(|| format!("{} is not valid JSON", index.display()))?;
        let Some(map) = v.get("weight_map").and_then(|m| m.as_object()) else {
            bail!("{} has no \"weight_map\" object", index.display());
        };
        let dir = index.parent().unwrap_or(Path::new("."));
        let mut files: Vec<PathBuf> = Vec::new();
        for (name, f) in map {
            let Some(f) = f.as_str() else {
                bail!(
                    "{}: weight_map[{name:?}] is not a file name",
                    index.display()
                );
            };
            let p = dir.join(f);
            if !files.contains(&p) {
                files.push(p);
            }
        }
        let mut all = Weights::default();
        for f in &files {
            let w = Self::load_file(f)?;
            all.tensors.extend(w.tensors);
            all.ints.extend(w.ints);
        }
        for name in map.keys() {
            if !all.tensors.contains_key(name) && !all.ints.contains_key(name) {
                bail!("{} lists {name:?} but no shard holds it", index.display());
            }
        }
        Ok(all)
    }

    pub fn load_file(path: &Path) -> Result<Weights> {
        let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        Self::from_bytes(&bytes)
            .with_context(|| format!("reading safetensors file {}", path.display()))
    }

    pub fn from_bytes(bytes: &[u8]) -> Result<Weights> {
        let st = SafeTensors::deserialize(bytes).map_err(|e| anyhow::anyhow!("{e}"))?;
        let mut w = Weights::default();
        for (name, view) in st.tensors() {
            let shape = view.shape().to_vec();
            let data = view.data();
            let floats: Option<Vec<f32>> = match view.dtype() {
                Dtype::F32 => Some(
                    data.chunks_exact(4)
                        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                        .collect(),
                ),
                Dtype::F64 => Some(
                    data.chunks_exact(8)
                        .map(|c| f64::from_le_bytes(c.try_into().unwrap()) as f32)
                        .collect(),
                ),
                Dtype::F16 => Some(
                    data.chunks_exact(2)
                        .map(|c| f16_to_f32(u16::from_le_bytes([c[0], c[1]])))
                        .collect(),
                ),
                Dtype::BF16 => Some(
                    data.chunks_exact(2)
                        .map(|c| f32::from_bits((u16::from_le_bytes([c[0], c[1]]) as u32) << 16))
                        .collect(),
                ),
                _ => None,
            };
            if let Some(data) = floats {
                w.tensors.insert(name, HostTensor { shape, data });
                continue;
            }
            let ints: Vec<i64> = match view.dtype() {
                Dtype::I64 => data
                    .chunks_exact(8)
                    .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
                    .collect(),
                Dtype::I32 => data
                    .chunks_exact(4)
                    .map(|c| i32::from_le_bytes(c.try_into().unwrap()) as i64)
                    .collect(),
                Dtype::U8 | Dtype::BOOL => data.iter().map(|&b| b as i64).collect(),
                other => bail!(
                    "tensor {name:?} has dtype {other:?}, which clip-wgpu does not read (weights \
                     must be F32, F64, F16 or BF16)"
                ),
            };
            w.ints.insert(name, (shape, ints));
        }
        Ok(w)
    }

    pub fn get(&self, name: &str) -> Result<&HostTensor> {
        self.tensors
            .get(name)
            .with_context(|| format!("tensor {name:?} is missing"))
    }
}

/// Write f32 tensors as `path` (safetensors, `format: pt` metadata as
/// transformers expects), through a temporary file and a rename so that a
/// crash never leaves a half-written file under the final name.
pub fn save_file(path: &Path, tensors: &[(String, HostTensor)]) -> Result<()> {
    let mut views = Vec::with_capacity(tensors.len());
    for (name, t) in tensors {
        ensure!(
            t.shape.iter().product::<usize>() == t.data.len(),
            "tensor {name:?}: shape {:?} does not match {} values",
            t.shape,
            t.data.len()
        );
        let view = safetensors::tensor::TensorView::new(
            Dtype::F32,
            t.shape.clone(),
            bytemuck::cast_slice(&t.data),
        )
        .map_err(|e| anyhow::anyhow!("tensor {name:?}: {e}"))?;
        views.push((name.clone(), view));
    }
    let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
    let bytes = safetensors::serialize(views, Some(meta))
        .map_err(|e| anyhow::anyhow!("serializing: {e}"))?;
    write_atomic(path, &bytes)
}

/// Write a file via `<path>.tmp` + fsync + rename.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let tmp = path.with_extension(format!(
        "{}.tmp",
        path.extension().and_then(|e| e.to_str()).unwrap_or("")
    ));
    {
        let mut f =
            std::fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        f.write_all(bytes)
            .with_context(|| format!("writing {}", tmp.display()))?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)
        .with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn f16_conversion_matches_known_values() {
        assert_eq!(f16_to_f32(0x3c00), 1.0);
        assert_eq!(f16_to_f32(0xc000), -2.0);
        assert_eq!(f16_to_f32(0x3555), 0.333_251_95);
        assert_eq!(f16_to_f32(0x0001), 5.960_464_5e-8); // smallest subnormal
        assert_eq!(f16_to_f32(0x7bff), 65504.0);
        assert!(f16_to_f32(0x7c00).is_infinite());
    }

    #[test]
    fn save_then_load_is_exact() {
        let dir = std::env::temp_dir().join(format!("clipwgpu-w-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("model.safetensors");
        let t = HostTensor::new(&[2, 3], vec![1.5, -2.0, 3.25, f32::MIN_POSITIVE, 0.1, 7.0]);
        save_file(&p, &[("a.weight".into(), t.clone())]).unwrap();
        let w = Weights::load_dir(&dir).unwrap();
        assert_eq!(w.get("a.weight").unwrap(), &t);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

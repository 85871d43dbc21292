//! Loading checkpoints: sharded files, half-precision upcast, and one clear
//! error for missing, unexpected or wrongly shaped tensors.
mod common;
use clip_wgpu::model::clip::ClipModel;
use clip_wgpu::model::weights::{save_file, HostTensor, Weights};
use common::cli::temp;
use common::*;
use std::path::Path;

fn write_shards(dir: &Path, w: &Weights, shards: usize) {
    let names: Vec<&String> = w.tensors.keys().collect();
    let mut map = serde_json::Map::new();
    for s in 0..shards {
        let file = format!("model-{:05}-of-{:05}.safetensors", s + 1, shards);
        let part: Vec<(String, HostTensor)> = names
            .iter()
            .enumerate()
            .filter(|(i, _)| i % shards == s)
            .map(|(_, n)| ((*n).clone(), w.tensors[*n].clone()))
            .collect();
        for (n, _) in &part {
            map.insert(n.clone(), serde_json::Value::String(file.clone()));
        }
        save_file(&dir.join(&file), &part).unwrap();
    }
    let index = serde_json::json!({"metadata": {"total_size": 0}, "weight_map": map});
    std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();
}

#[test]
fn sharded_checkpoint_loads_like_a_single_file() {
    let src = fixture_model("clip_roberta");
    let single = Weights::load_dir(&src).unwrap();
    let dir = temp("shards");
    std::fs::copy(src.join("config.json"), dir.join("config.json")).unwrap();
    write_shards(&dir, &single, 3);
    let sharded = Weights::load_dir(&dir).unwrap();
    assert_eq!(single.tensors, sharded.tensors);
    if let Some(gpu) = gpu() {
        ClipModel::load(&gpu, &dir).unwrap();
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// f16 and bf16 files (as `torch_dtype=float16` checkpoints hold) upcast to f32.
#[test]
fn half_precision_tensors_upcast() {
    let mut header = serde_json::Map::new();
    let f16: [u16; 3] = [0x3c00, 0xc000, 0x3555]; // 1, -2, 0.33325195
    let bf16: [u16; 2] = [0x3f80, 0xc0a0]; // 1, -5
    let mut data = Vec::new();
    for (name, dtype, vals) in [("a", "F16", &f16[..]), ("b", "BF16", &bf16[..])] {
        let start = data.len();
        for v in vals {
            data.extend_from_slice(&v.to_le_bytes());
        }
        header.insert(
            name.into(),
            serde_json::json!({"dtype": dtype, "shape": [vals.len()], "data_offsets": [start, data.len()]}),
        );
    }
    let h = serde_json::Value::Object(header).to_string();
    let mut bytes = (h.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(h.as_bytes());
    bytes.extend_from_slice(&data);
    let w = Weights::from_bytes(&bytes).unwrap();
    assert_eq!(w.get("a").unwrap().data, vec![1.0, -2.0, 0.333_251_95]);
    assert_eq!(w.get("b").unwrap().data, vec![1.0, -5.0]);
}

#[test]
fn mismatched_checkpoint_names_every_problem() {
    let Some(gpu) = gpu() else { return };
    let src = fixture_model("clip_roberta");
    let mut w = Weights::load_dir(&src).unwrap();
    w.tensors.remove("visual_projection.weight");
    w.tensors
        .insert("extra.weight".into(), HostTensor::new(&[2], vec![0.0, 1.0]));
    let t = w.tensors.get_mut("text_projection.weight").unwrap();
    t.shape = vec![t.data.len()];
    // Old checkpoints' position_ids buffers are ignored, not unexpected.
    w.ints.insert(
        "vision_model.embeddings.position_ids".into(),
        (vec![1, 26], (0..26).collect()),
    );
    let dir = temp("mismatch");
    std::fs::copy(src.join("config.json"), dir.join("config.json")).unwrap();
    let all: Vec<(String, HostTensor)> = w.tensors.into_iter().collect();
    save_file(&dir.join("model.safetensors"), &all).unwrap();
    let err = format!(
        "{:#}",
        ClipModel::load(&gpu, &dir).err().expect("load must fail")
    );
    for needle in [
        "visual_projection.weight",
        "extra.weight",
        "text_projection.weight",
        "missing",
        "unexpected",
        "wrong shape",
    ] {
        assert!(
            err.contains(needle),
            "error does not mention {needle}: {err}"
        );
    }
    assert!(
        !err.contains("position_ids"),
        "position_ids should be ignored: {err}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn transformers4_nested_dual_encoder_names_load() {
    let Some(gpu) = gpu() else { return };
    let src = fixture_model("clip_roberta");
    let w = Weights::load_dir(&src).unwrap();
    let renamed: Vec<(String, HostTensor)> = w
        .tensors
        .iter()
        .map(|(k, v)| {
            let k = match k.strip_prefix("vision_model.") {
                Some(rest) => format!("vision_model.vision_model.{rest}"),
                None => k.clone(),
            };
            (k, v.clone())
        })
        .collect();
    let dir = temp("nested");
    std::fs::copy(src.join("config.json"), dir.join("config.json")).unwrap();
    save_file(&dir.join("model.safetensors"), &renamed).unwrap();
    let m = ClipModel::load(&gpu, &dir).unwrap();
    let got = m.params.to_host().unwrap();
    for (name, t) in got {
        assert_eq!(&t.data, &w.tensors[&name].data, "{name}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn broken_files_are_errors_naming_the_file() {
    let dir = temp("broken");
    let p = dir.join("model.safetensors");
    std::fs::write(&p, b"\x10\x00\x00\x00\x00\x00\x00\x00{not json").unwrap();
    let e = format!("{:#}", Weights::load_dir(&dir).unwrap_err());
    assert!(e.contains("model.safetensors"), "{e}");
    std::fs::write(&p, b"\x01").unwrap();
    let e = format!("{:#}", Weights::load_dir(&dir).unwrap_err());
    assert!(e.contains("model.safetensors"), "{e}");
    std::fs::remove_file(&p).unwrap();
    let e = format!("{:#}", Weights::load_dir(&dir).unwrap_err());
    assert!(e.contains("no model.safetensors"), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
}

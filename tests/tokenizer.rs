//! TextTokenizer against transformers' CLIPTokenizer
//! (tests/fixtures/tokenizer/clip.json, made by make.py beside it).

use clip_wgpu::data::TextTokenizer;
use serde_json::Value;
use std::path::PathBuf;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn clip_tokenizer() -> TextTokenizer {
    TextTokenizer::from_model_dir(&root().join("assets/clip-tokenizer")).unwrap()
}

fn ids_of(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

#[test]
fn a_photo_of_a_cat() {
    let tok = clip_tokenizer();
    assert_eq!(tok.pad_id(), Some(49407));
    assert_eq!(
        tok.encode("a photo of a cat").unwrap(),
        [49406, 320, 1125, 539, 320, 2368, 49407]
    );
    let (ids, mask) = tok.encode_batch(&["a photo of a cat"], 10).unwrap();
    assert_eq!(
        ids,
        [49406, 320, 1125, 539, 320, 2368, 49407, 49407, 49407, 49407]
    );
    assert_eq!(mask, [1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0]);
}

#[test]
fn matches_transformers() {
    let tok = clip_tokenizer();
    let path = root().join("tests/fixtures/tokenizer/clip.json");
    let fx: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let captions: Vec<&str> = fx["captions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_str().unwrap())
        .collect();
    assert_eq!(fx["pad_token_id"].as_u64(), Some(49407));

    for (cap, want) in captions.iter().zip(fx["untruncated"].as_array().unwrap()) {
        assert_eq!(
            tok.encode(cap).unwrap(),
            ids_of(want),
            "untruncated {cap:?}"
        );
    }
    let mut checked = 0;
    for case in fx["cases"].as_array().unwrap() {
        let max_len = case["max_len"].as_u64().unwrap() as usize;
        let (ids, mask) = tok.encode_batch(&captions, max_len).unwrap();
        assert_eq!(ids.len(), captions.len() * max_len);
        for (b, cap) in captions.iter().enumerate() {
            let want_ids = ids_of(&case["input_ids"][b]);
            let want_mask: Vec<f32> = ids_of(&case["attention_mask"][b])
                .iter()
                .map(|&m| m as f32)
                .collect();
            let row = &ids[b * max_len..(b + 1) * max_len];
            assert_eq!(
                row,
                want_ids.as_slice(),
                "ids of {cap:?} at max_len {max_len}"
            );
            assert_eq!(
                &mask[b * max_len..(b + 1) * max_len],
                want_mask.as_slice(),
                "mask of {cap:?}"
            );
            // Truncated or not, the last real token is <|endoftext|>.
            let n = want_mask.iter().filter(|&&m| m == 1.0).count();
            assert_eq!(row[0], 49406);
            assert_eq!(row[n - 1], 49407);
            checked += 1;
        }
    }
    println!("{checked} (caption, max_len) pairs identical to transformers' CLIPTokenizer");
}

#[test]
fn long_caption_is_truncated_with_eos_last() {
    let tok = clip_tokenizer();
    let long = "a very long caption ".repeat(50);
    let (ids, mask) = tok.encode_batch(&[long.as_str(), "short"], 77).unwrap();
    assert_eq!(ids.len(), 2 * 77);
    assert_eq!(ids[0], 49406);
    assert_eq!(ids[76], 49407);
    assert!(mask[..77].iter().all(|&m| m == 1.0));
    // The short one is padded with 49407 and masked.
    assert_eq!(mask[77..].iter().filter(|&&m| m == 1.0).count(), 3);
    assert!(ids[77 + 3..].iter().all(|&i| i == 49407));
    // encode_batch leaves no padding/truncation behind for encode().
    assert_eq!(tok.encode(&long).unwrap().len(), 2 + 4 * 50);
}

fn tmpdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("clip-wgpu-tok-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn pad_token_from_tokenizer_config() {
    let src = root().join("assets/clip-tokenizer/tokenizer.json");
    let d = tmpdir("pad");
    std::fs::copy(&src, d.join("tokenizer.json")).unwrap();
    // As an AddedToken object, the older tokenizer_config.json form.
    std::fs::write(
        d.join("tokenizer_config.json"),
        r#"{"pad_token": {"__type": "AddedToken", "content": "<|startoftext|>"}, "padding_side": "left"}"#,
    )
    .unwrap();
    let tok = TextTokenizer::from_model_dir(&d).unwrap();
    assert_eq!(tok.pad_id(), Some(49406));
    let (ids, mask) = tok.encode_batch(&["a cat"], 6).unwrap();
    assert_eq!(ids, [49406, 49406, 49406, 320, 2368, 49407]);
    assert_eq!(mask, [0.0, 0.0, 1.0, 1.0, 1.0, 1.0]);

    // No config at all: tokenizer.json has no padding section, so no pad token.
    std::fs::remove_file(d.join("tokenizer_config.json")).unwrap();
    let tok = TextTokenizer::from_model_dir(&d).unwrap();
    assert_eq!(tok.pad_id(), None);
    let err = tok.encode_batch(&["a cat"], 6).unwrap_err().to_string();
    assert!(err.contains("no pad token"), "{err}");

    std::fs::write(
        d.join("tokenizer_config.json"),
        r#"{"pad_token": "<nope>"}"#,
    )
    .unwrap();
    let err = format!("{:#}", TextTokenizer::from_model_dir(&d).unwrap_err());
    assert!(err.contains("<nope>"), "{err}");
    std::fs::write(d.join("tokenizer_config.json"), r#"{"pad_token": 5}"#).unwrap();
    let err = format!("{:#}", TextTokenizer::from_model_dir(&d).unwrap_err());
    assert!(
        err.contains("tokenizer_config.json") && err.contains("pad_token"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn missing_or_broken_tokenizer_names_the_path() {
    let d = tmpdir("broken");
    let err = format!("{:#}", TextTokenizer::from_model_dir(&d).unwrap_err());
    assert!(
        err.contains(&d.join("tokenizer.json").display().to_string()),
        "{err}"
    );
    std::fs::write(d.join("tokenizer.json"), "{ not json").unwrap();
    let err = format!("{:#}", TextTokenizer::from_model_dir(&d).unwrap_err());
    assert!(
        err.contains(&d.join("tokenizer.json").display().to_string()),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn parity_fixture_model_dir() {
    // The tokenizer transformers 5 saved beside the tiny CLIP parity model
    // (tokenizer.json re-serialized, no vocab.json/merges.txt) and the ids
    // its generator recorded for max_length 13.
    let dir = root().join("tests/fixtures/clip/model");
    let path = root().join("tests/fixtures/clip/captions.json");
    if !dir.join("tokenizer.json").is_file() || !path.is_file() {
        return;
    }
    let tok = TextTokenizer::from_model_dir(&dir).unwrap();
    let fx: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let captions: Vec<&str> = fx["captions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_str().unwrap())
        .collect();
    let t = fx["input_ids"][0].as_array().unwrap().len();
    let (ids, mask) = tok.encode_batch(&captions, t).unwrap();
    for b in 0..captions.len() {
        assert_eq!(
            &ids[b * t..(b + 1) * t],
            ids_of(&fx["input_ids"][b]).as_slice()
        );
        let m: Vec<f32> = ids_of(&fx["attention_mask"][b])
            .iter()
            .map(|&m| m as f32)
            .collect();
        assert_eq!(&mask[b * t..(b + 1) * t], m.as_slice());
    }
}

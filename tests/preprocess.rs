//! CLIPImageProcessor parity: our pixels against transformers 5.24's
//! (`CLIPImageProcessorPil`, the class `CLIPImageProcessor` resolves to
//! without torchvision). Fixtures: tests/fixtures/preprocess/ (real pictures,
//! made by ../generate.py) and tests/fixtures/preprocess_extra/ (edge cases,
//! made by make.py there). Differences are reported in 1/255 units before
//! normalization.

mod common;
use clip_wgpu::data::image::{
    center_crop, load_image, preprocess, resize_and_crop, shortest_edge_hw, to_rgb, ConfigSource,
    ImageProcessorConfig,
};
use clip_wgpu::model::weights::Weights;
use common::fixtures;
use image::{DynamicImage, RgbImage};
use std::path::{Path, PathBuf};

/// HWC u8 -> CHW as f32, the layout the processor returns.
fn chw(rgb: &RgbImage) -> Vec<f32> {
    let (w, h) = (rgb.width() as usize, rgb.height() as usize);
    let mut out = vec![0f32; 3 * h * w];
    for (i, p) in rgb.as_raw().chunks_exact(3).enumerate() {
        for c in 0..3 {
            out[c * h * w + i] = p[c] as f32;
        }
    }
    out
}

/// Max |a - b| of normalized outputs, mapped back to 1/255 units before
/// normalization (x255 = (y * std + mean) / rescale_factor).
fn diff255(ours: &[f32], theirs: &[f32], cfg: &ImageProcessorConfig) -> f64 {
    assert_eq!(ours.len(), theirs.len());
    let plane = ours.len() / 3;
    let mut worst = 0f64;
    for (i, (a, b)) in ours.iter().zip(theirs).enumerate() {
        let c = i / plane;
        let mut d = (*a as f64 - *b as f64).abs();
        if cfg.do_normalize {
            d *= cfg.std[c] as f64;
        }
        if cfg.do_rescale {
            d /= cfg.rescale_factor;
        }
        worst = worst.max(d);
    }
    worst
}

/// assert_eq for long vectors: reports the count and the first mismatch only.
fn assert_same(ours: &[f32], theirs: &[f32], what: &str) {
    if let Some(msg) = mismatch(ours, theirs, what) {
        panic!("{msg}");
    }
}

fn mismatch(ours: &[f32], theirs: &[f32], what: &str) -> Option<String> {
    assert_eq!(ours.len(), theirs.len(), "{what}: lengths");
    let bad: Vec<usize> = (0..ours.len())
        .filter(|&i| ours[i].to_bits() != theirs[i].to_bits())
        .collect();
    let &i = bad.first()?;
    {
        Some(format!(
            "{what}: {} of {} values differ, first at {i}: ours {} theirs {}; max |diff| {}",
            bad.len(),
            ours.len(),
            ours[i],
            theirs[i],
            max_abs(ours, theirs)
        ))
    }
}

fn max_abs(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

#[test]
fn real_pictures_match_transformers() {
    let dir = fixtures().join("preprocess");
    let Ok(w) = Weights::load_file(&dir.join("pixels.safetensors")) else {
        eprintln!("tests/fixtures/preprocess/pixels.safetensors missing; skipped");
        return;
    };
    let mut checked = 0;
    for name in w.tensors.keys() {
        let (file, setting) = name.split_once('/').unwrap();
        let want = &w.tensors[name];
        let (cfg, source) =
            ImageProcessorConfig::from_model_dir_with_source(&dir.join(setting)).unwrap();
        assert!(matches!(source, ConfigSource::File(_)), "{source}");
        assert_eq!(want.shape, [3, cfg.crop_h, cfg.crop_w], "{name}");
        let img = load_image(&dir.join(file)).unwrap();

        // Our decode + RGB conversion against PIL's (stored as `<file>/rgb`).
        let (rgb_shape, rgb_want) = &w.ints[&format!("{file}/rgb")];
        let rgb = to_rgb(&img);
        assert_eq!(
            rgb_shape,
            &[rgb.height() as usize, rgb.width() as usize, 3],
            "{file}"
        );
        let decode_diff = rgb
            .as_raw()
            .iter()
            .zip(rgb_want)
            .map(|(&a, &b)| (a as i64 - b).abs())
            .max()
            .unwrap();
        let differing = rgb
            .as_raw()
            .iter()
            .zip(rgb_want)
            .filter(|(&a, &b)| a as i64 != b)
            .count();

        // Resize/crop/normalize alone, from PIL's decoded pixels: exact.
        let pil_rgb = RgbImage::from_raw(
            rgb.width(),
            rgb.height(),
            rgb_want.iter().map(|&v| v as u8).collect(),
        )
        .unwrap();
        let from_pil = preprocess(&DynamicImage::ImageRgb8(pil_rgb), &cfg).unwrap();
        let d_pipeline = diff255(&from_pil, &want.data, &cfg);
        assert_same(
            &from_pil,
            &want.data,
            &format!("{name} (pipeline from PIL's decoded pixels)"),
        );

        // End to end from the file.
        let ours = preprocess(&img, &cfg).unwrap();
        let d_total = diff255(&ours, &want.data, &cfg);
        println!(
            "{name}: pipeline max diff {d_pipeline:.3}/255; end to end {d_total:.3}/255 \
             (normalized {:.2e}); decode diff vs PIL max {decode_diff} in {differing} of {} values",
            max_abs(&ours, &want.data),
            rgb.as_raw().len()
        );
        // PNG, and JPEG through our libjpeg-turbo-exact decoder: exact.
        assert_eq!(decode_diff, 0, "{file}: decode/alpha differs from PIL's");
        assert_same(&ours, &want.data, name);
        checked += 1;
    }
    assert!(checked >= 6, "only {checked} fixtures");
}

#[test]
fn edge_cases_match_transformers() {
    let dir = fixtures().join("preprocess_extra");
    let w = Weights::load_file(&dir.join("expected.safetensors")).unwrap();
    let mut checked = 0;
    let mut worst = 0f64;
    let mut failures = Vec::new();
    let mut names: Vec<&String> = w.tensors.keys().chain(w.ints.keys()).collect();
    // Plain conversion first: a decode/alpha mismatch shows there, not as a resize one.
    names.sort_by_key(|n| (!n.ends_with("/noresize"), n.to_string()));
    for name in names {
        let (file, setting) = name.split_once('/').unwrap();
        let cfg =
            ImageProcessorConfig::from_model_dir(&dir.join("settings").join(setting)).unwrap();
        let img = load_image(&dir.join(file)).unwrap();
        let ours_u8 = resize_and_crop(&img, &cfg).unwrap();
        let ours = preprocess(&img, &cfg).unwrap();
        let (oh, ow) = cfg.output_hw(img.width() as usize, img.height() as usize);
        assert_eq!(
            (ours_u8.height() as usize, ours_u8.width() as usize),
            (oh, ow),
            "{name}"
        );
        let d = if let Some(t) = w.tensors.get(name) {
            assert_eq!(t.shape, [3, oh, ow], "{name}");
            let d = diff255(&ours, &t.data, &cfg);
            failures.extend(mismatch(&ours, &t.data, name));
            d
        } else {
            let (shape, want) = &w.ints[name];
            assert_eq!(shape, &[3, oh, ow], "{name}");
            assert!(!cfg.do_rescale && !cfg.do_normalize);
            let want: Vec<f32> = want.iter().map(|&v| v as f32).collect();
            let d = max_abs(&chw(&ours_u8), &want) as f64;
            failures.extend(mismatch(&ours, &want, name));
            d
        };
        worst = worst.max(d);
        checked += 1;
    }
    println!("{checked} edge-case outputs, max diff {worst}/255 before normalization");
    assert!(
        failures.is_empty(),
        "{} mismatches:\n{}",
        failures.len(),
        failures.join("\n")
    );
    assert!(checked > 90);
}

fn tmpdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("clip-wgpu-pre-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn err_of(dir: &Path) -> String {
    format!(
        "{:#}",
        ImageProcessorConfig::from_model_dir(dir).unwrap_err()
    )
}

#[test]
fn config_files() {
    let d = tmpdir("cfg");
    // Missing: defaults, with a note saying so.
    let (cfg, src) = ImageProcessorConfig::from_model_dir_with_source(&d).unwrap();
    assert_eq!(cfg, ImageProcessorConfig::default());
    assert!(matches!(src, ConfigSource::Default { .. }));
    assert!(src.to_string().contains("defaults"));
    assert!(ImageProcessorConfig::from_model_dir(&d.join("nope")).is_err());

    let pre = d.join("preprocessor_config.json");
    std::fs::write(&pre, r#"{"size": 256, "crop_size": 240, "resample": 2, "image_mean": 0.5, "do_normalize": null}"#).unwrap();
    let cfg = ImageProcessorConfig::from_model_dir(&d).unwrap();
    assert_eq!(
        (cfg.shortest_edge, cfg.resize_to, cfg.crop_h, cfg.crop_w),
        (256, None, 240, 240)
    );
    assert_eq!(
        (cfg.resample, cfg.mean, cfg.do_normalize),
        (2, [0.5; 3], true)
    );
    std::fs::write(
        &pre,
        r#"{"size": {"height": 32, "width": 48}, "crop_size": [20, 30]}"#,
    )
    .unwrap();
    let cfg = ImageProcessorConfig::from_model_dir(&d).unwrap();
    assert_eq!(
        (cfg.resize_to, cfg.crop_h, cfg.crop_w),
        (Some((32, 48)), 20, 30)
    );

    // processor_config.json's nested entry wins over preprocessor_config.json.
    std::fs::write(d.join("processor_config.json"), r#"{"image_processor": {"size": {"shortest_edge": 30}, "crop_size": {"height": 30, "width": 30}}}"#).unwrap();
    let (cfg, src) = ImageProcessorConfig::from_model_dir_with_source(&d).unwrap();
    assert_eq!((cfg.shortest_edge, cfg.crop_h), (30, 30));
    assert_eq!(src, ConfigSource::File(d.join("processor_config.json")));
    // ... unless it has none.
    std::fs::write(
        d.join("processor_config.json"),
        r#"{"processor_class": "CLIPProcessor"}"#,
    )
    .unwrap();
    assert_eq!(
        ImageProcessorConfig::from_model_dir(&d).unwrap().resize_to,
        Some((32, 48))
    );

    // Errors name the file and the key.
    std::fs::write(&pre, "{ broken").unwrap();
    let e = err_of(&d);
    assert!(e.contains("preprocessor_config.json"), "{e}");
    for (body, key) in [
        (r#"{"do_resize": "yes"}"#, "do_resize"),
        (r#"{"size": {"shortest_edge": -3}}"#, "size.shortest_edge"),
        (
            r#"{"size": {"longest_edge": 3, "shortest_edge": 2}}"#,
            "size.longest_edge",
        ),
        (r#"{"size": {"wide": 3}}"#, "wide"),
        (r#"{"crop_size": {"shortest_edge": 3}}"#, "crop_size"),
        (r#"{"image_std": [1, 2]}"#, "image_std"),
        (r#"{"resample": "bicubic"}"#, "resample"),
        (r#"{"rescale_factor": "x"}"#, "rescale_factor"),
    ] {
        std::fs::write(&pre, body).unwrap();
        let e = err_of(&d);
        assert!(
            e.contains("preprocessor_config.json") && e.contains(key),
            "{body}: {e}"
        );
    }
    std::fs::write(
        d.join("processor_config.json"),
        r#"{"image_processor": {"do_resize": 1}}"#,
    )
    .unwrap();
    let e = err_of(&d);
    assert!(
        e.contains("processor_config.json") && e.contains("image_processor.do_resize"),
        "{e}"
    );
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn load_image_errors_name_the_path() {
    let d = tmpdir("load");
    let missing = d.join("missing.png");
    let e = format!("{:#}", load_image(&missing).unwrap_err());
    assert!(e.contains(&missing.display().to_string()), "{e}");
    let bad = d.join("corrupt.jpg");
    std::fs::write(&bad, b"\xff\xd8\xff\xe0 this is not really a jpeg").unwrap();
    let e = format!("{:#}", load_image(&bad).unwrap_err());
    assert!(e.contains(&bad.display().to_string()), "{e}");
    let txt = d.join("notes.txt");
    std::fs::write(&txt, b"hello").unwrap();
    let e = format!("{:#}", load_image(&txt).unwrap_err());
    assert!(e.contains(&txt.display().to_string()), "{e}");
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn sizes_and_crop_rules() {
    // int(224 * long / short), short side first in (h, w) order.
    assert_eq!(shortest_edge_hw(640, 480, 224), (224, 298));
    assert_eq!(shortest_edge_hw(181, 200, 224), (247, 224));
    assert_eq!(shortest_edge_hw(3, 1, 40), (40, 120));
    assert_eq!(shortest_edge_hw(100, 100, 224), (224, 224));
    // Crop of a 5x3 image to 4x6 (h x w): rows from (3-4)//2 = -1, cols (5-6)//2 = -1.
    let src = RgbImage::from_fn(5, 3, |x, y| image::Rgb([(10 * y + x) as u8 + 1, 0, 0]));
    let out = center_crop(&src, 4, 6);
    let r: Vec<u8> = out.pixels().map(|p| p[0]).collect();
    #[rustfmt::skip]
    assert_eq!(r, [
        0, 0, 0, 0, 0, 0,
        0, 1, 2, 3, 4, 5,
        0, 11, 12, 13, 14, 15,
        0, 21, 22, 23, 24, 25,
    ]);
}

#[test]
fn jpeg_fixtures_use_the_exact_decoder() {
    // No silent fallback to the `image` crate for the JPEG kinds we cover.
    let dir = fixtures().join("preprocess_extra");
    let mut n = 0;
    for e in std::fs::read_dir(&dir).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "jpg") {
            let bytes = std::fs::read(&p).unwrap();
            clip_wgpu::data::jpeg::decode(&bytes)
                .unwrap_or_else(|e| panic!("{}: {e:#}", p.display()));
            n += 1;
        }
    }
    assert!(n >= 10, "{n} JPEGs");
}

/// Manual check on any JPEG: `CLIP_WGPU_JPEG=x.jpg CLIP_WGPU_RGB=x.rgb cargo
/// test --test preprocess -- --ignored --nocapture`, where x.rgb is PIL's
/// decode as raw bytes (`Image.open(p).tobytes()`, RGB or L).
#[test]
#[ignore]
fn jpeg_against_pil_dump() {
    let (Ok(jpg), Ok(raw)) = (
        std::env::var("CLIP_WGPU_JPEG"),
        std::env::var("CLIP_WGPU_RGB"),
    ) else {
        return;
    };
    let t = std::time::Instant::now();
    let img = load_image(Path::new(&jpg)).unwrap();
    let dt = t.elapsed();
    let ours = img.as_bytes();
    let want = std::fs::read(raw).unwrap();
    assert_eq!(ours.len(), want.len());
    let bad = ours.iter().zip(&want).filter(|(a, b)| a != b).count();
    let max = ours
        .iter()
        .zip(&want)
        .map(|(&a, &b)| (a as i32 - b as i32).abs())
        .max()
        .unwrap();
    println!(
        "{jpg}: {}x{} decoded in {dt:?}; {bad} of {} bytes differ from PIL, max {max}",
        img.width(),
        img.height(),
        ours.len()
    );
    let t = std::time::Instant::now();
    let px = preprocess(&img, &ImageProcessorConfig::default()).unwrap();
    println!("preprocess to {} values in {:?}", px.len(), t.elapsed());
    assert_eq!(bad, 0);
}

#[test]
fn jpeg_decoder_survives_corruption() {
    // Truncated or bit-flipped files must give an image or an error, never a panic.
    let dir = fixtures().join("preprocess_extra");
    let mut seed = 12345u64;
    for name in [
        "j420_prog_rst.jpg",
        "j411.jpg",
        "j444_prog.jpg",
        "j420_q30.jpg",
    ] {
        let bytes = std::fs::read(dir.join(name)).unwrap();
        for cut in (2..bytes.len()).step_by(bytes.len() / 23 + 1) {
            let _ = clip_wgpu::data::jpeg::decode(&bytes[..cut]);
        }
        for _ in 0..200 {
            let mut b = bytes.clone();
            for _ in 0..3 {
                seed = seed
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let i = (seed >> 33) as usize % b.len();
                b[i] ^= 1 << ((seed >> 29) & 7);
            }
            let _ = clip_wgpu::data::jpeg::decode(&b);
        }
    }
}

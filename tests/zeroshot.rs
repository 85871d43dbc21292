//! `clip-wgpu zero-shot` against a reference computed with transformers the
//! CLIP_benchmark way (tests/fixtures/zeroshot, made by
//! tests/fixtures/generate.py): the same classes, files, top-1 prediction
//! for every picture, and logits within 1e-4; plus the classes-file and
//! templates formats, the metrics and the ImageFolder rules.

mod common;

use clip_wgpu::zeroshot::{
    self, metrics, parse_classes, parse_templates, ImageFolder, Options, Templates,
};
use common::cli::{bin, have_gpu, temp};
use common::{fixtures, gpu};
use serde_json::Value;
use std::path::Path;

/// Measured on lavapipe: 3.1e-5 at most (logits up to ~40 in size).
const LOGIT_TOL: f64 = 1e-4;

fn reference() -> Value {
    let p = fixtures().join("zeroshot/reference.json");
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

fn f32s(v: &Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

fn options(case: &Value) -> Options {
    let dir = fixtures().join("zeroshot");
    let t = case["cli_templates"].as_str().unwrap();
    let templates = if t == "openai" || t == "simple" {
        t.to_string()
    } else {
        dir.join(t).to_string_lossy().into_owned()
    };
    Options {
        model: dir.join("model"),
        data: dir.join("images"),
        classes: case["classes_file"].as_str().map(|f| dir.join(f)),
        templates,
        batch_size: 5, // batches of 5 pictures and 5 prompts: several, and a short last one
        workers: 2,
        progress: false,
    }
}

fn slash(p: &Path) -> String {
    p.components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join("/")
}

#[test]
fn zero_shot_matches_transformers() {
    let Some(gpu) = gpu() else { return };
    let r = reference();
    let files: Vec<&str> = r["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f.as_str().unwrap())
        .collect();
    let labels: Vec<usize> = r["labels"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l.as_u64().unwrap() as usize)
        .collect();
    for (name, case) in r["cases"].as_object().unwrap() {
        let zs = zeroshot::run(&gpu, &options(case)).unwrap();
        let classes: Vec<String> = zs.classes.iter().map(|c| c.name.clone()).collect();
        let want: Vec<String> = case["classes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c.as_str().unwrap().to_string())
            .collect();
        assert_eq!(classes, want, "{name}: class names");
        assert_eq!(
            zs.templates.templates.len(),
            case["templates"].as_array().unwrap().len(),
            "{name}: templates"
        );
        let got_files: Vec<String> = zs.files.iter().map(|f| slash(f)).collect();
        assert_eq!(got_files, files, "{name}: pictures (ImageFolder order)");
        assert_eq!(zs.labels, labels, "{name}: labels");
        assert_eq!(zs.skipped.len(), 1, "{name}: skipped {:?}", zs.skipped);
        assert!(
            zs.skipped[0].0.ends_with("hot_dog/broken.png"),
            "{:?}",
            zs.skipped
        );

        let mut worst_emb = 0f64;
        for (got, want) in zs
            .class_embeddings
            .iter()
            .zip(case["class_embeddings"].as_array().unwrap())
        {
            for (a, b) in got.iter().zip(f32s(want)) {
                worst_emb = worst_emb.max((*a as f64 - b as f64).abs());
            }
        }
        let mut worst = 0f64;
        for (i, (got, want)) in zs
            .logits
            .iter()
            .zip(case["logits"].as_array().unwrap())
            .enumerate()
        {
            let want = f32s(want);
            assert_eq!(got.len(), want.len());
            for (a, b) in got.iter().zip(&want) {
                let d = (*a as f64 - *b as f64).abs();
                worst = worst.max(d);
                assert!(
                    d <= LOGIT_TOL,
                    "{name}: {}: logits {got:?}, transformers {want:?}",
                    files[i]
                );
            }
        }
        let m = zs.metrics();
        let preds: Vec<usize> = case["predictions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p.as_u64().unwrap() as usize)
            .collect();
        assert_eq!(m.predictions, preds, "{name}: top-1 of every picture");
        assert!((m.top1 - case["top1"].as_f64().unwrap()).abs() < 1e-12);
        assert!(
            (m.mean_per_class_recall - case["mean_per_class_recall"].as_f64().unwrap()).abs()
                < 1e-12
        );
        assert_eq!(m.top5, None, "4 classes: no top-5 (CLIP_benchmark: NaN)");
        eprintln!(
            "zero-shot {name}: max |logit - transformers| {worst:.2e}, class embeddings {worst_emb:.2e}"
        );
        assert!(
            worst_emb < 2e-6,
            "{name}: class embeddings off by {worst_emb}"
        );
    }
}

/// The binary: the JSON report's per-picture predictions and logits, and
/// the figures, as the reference has them.
#[test]
fn zero_shot_cli_report() {
    if !have_gpu() {
        return;
    }
    let r = reference();
    let case = &r["cases"]["openai"];
    let dir = fixtures().join("zeroshot");
    let out = temp("zeroshot-cli").join("report.json");
    let o = bin()
        .args(["zero-shot", "--model"])
        .arg(dir.join("model"))
        .arg("--data")
        .arg(dir.join("images"))
        .arg("--classes")
        .arg(dir.join("classes.json"))
        .args(["--templates", "openai", "--batch_size", "4", "--output"])
        .arg(&out)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(stdout.contains("top-1 41.7% (chance 25.0%)"), "{stdout}");
    assert!(stdout.contains("skipped 1 unreadable picture"), "{stdout}");
    let rep: Value = serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    assert_eq!(rep["num_classes"], 4);
    assert_eq!(rep["num_images"], 12);
    assert_eq!(rep["num_templates"], 80);
    assert_eq!(rep["logit_scale"], 100.0);
    assert!(rep["top5"].is_null());
    assert_eq!(rep["top1"].as_f64(), case["top1"].as_f64());
    assert_eq!(rep["skipped"].as_array().unwrap().len(), 1);
    let preds = rep["predictions"].as_array().unwrap();
    assert_eq!(preds.len(), 12);
    for (i, p) in preds.iter().enumerate() {
        assert_eq!(
            p["file"].as_str().unwrap().replace('\\', "/"),
            r["files"][i]
        );
        assert_eq!(p["label_index"], r["labels"][i]);
        assert_eq!(p["prediction_index"], case["predictions"][i]);
        let want = f32s(&case["logits"][i]);
        let top = p["top5"].as_array().unwrap();
        assert_eq!(top.len(), 4, "all 4 classes, best first");
        for t in top {
            let k = t["index"].as_u64().unwrap() as usize;
            let d = (t["logit"].as_f64().unwrap() - want[k] as f64).abs();
            assert!(d <= LOGIT_TOL, "{}: class {k}: {d}", r["files"][i]);
        }
    }
    // The worst classes come with what they were taken for.
    let worst = rep["worst_classes"].as_array().unwrap();
    assert_eq!(worst.len(), 4);
    let recalls: Vec<f64> = worst
        .iter()
        .map(|w| w["recall"].as_f64().unwrap())
        .collect();
    assert!(recalls.windows(2).all(|w| w[0] <= w[1]), "{recalls:?}");
    for w in worst {
        let wrong: u64 = w["predicted_as"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["count"].as_u64().unwrap())
            .sum();
        assert_eq!(
            wrong,
            w["images"].as_u64().unwrap() - w["correct"].as_u64().unwrap()
        );
    }
}

#[test]
fn zero_shot_cli_reports_bad_input_clearly() {
    let dir = fixtures().join("zeroshot");
    let run = |extra: &[&str], data: &Path| {
        let o = bin()
            .args(["zero-shot", "--model"])
            .arg(dir.join("model"))
            .arg("--data")
            .arg(data)
            .args(extra)
            .output()
            .unwrap();
        assert!(!o.status.success());
        String::from_utf8_lossy(&o.stderr).to_string()
    };
    let images = dir.join("images");
    let e = run(&["--templates", "/no/such/templates.txt"], &images);
    assert!(e.contains("not `openai` or `simple`"), "{e}");
    let e = run(&[], Path::new("/no/such/folder"));
    assert!(e.contains("not a folder"), "{e}");
    let e = run(&[], &images.join("cat"));
    assert!(e.contains("at least two classes"), "{e}");
    let t = temp("zeroshot-badclasses");
    std::fs::write(t.join("c.tsv"), "dog\ta dog\n").unwrap();
    let e = run(&["--classes", t.join("c.tsv").to_str().unwrap()], &images);
    assert!(
        e.contains("names folder \"dog\"") && e.contains("cat, hot_dog, traffic_light, zebra"),
        "{e}"
    );
}

#[test]
fn shipped_templates_are_openclips() {
    let o = Templates::from_spec("openai").unwrap().templates;
    assert_eq!(o.len(), 80);
    assert_eq!(o[0], "a bad photo of a {c}.");
    assert_eq!(o[79], "a tattoo of the {c}.");
    let s = Templates::from_spec("simple").unwrap().templates;
    assert_eq!(
        s,
        [
            "itap of a {c}.",
            "a bad photo of the {c}.",
            "a origami {c}.",
            "a photo of the large {c}.",
            "a {c} in a video game.",
            "art of the {c}.",
            "a photo of the small {c}.",
        ]
    );
    assert_eq!(
        Templates::prompt("a {c} in a video game.", "hot dog"),
        "a hot dog in a video game."
    );
}

#[test]
fn templates_file_format() {
    let t = parse_templates("\u{feff}# comment\n\n  a photo of a {c}.  \r\n{c}\n", "t").unwrap();
    assert_eq!(t, ["a photo of a {c}.", "{c}"]);
    let e = parse_templates("a photo\n", "t.txt")
        .unwrap_err()
        .to_string();
    assert!(e.contains("t.txt, line 1") && e.contains("{c}"), "{e}");
    assert!(parse_templates("# only a comment\n", "t").is_err());
}

#[test]
fn classes_file_formats() {
    let tsv = parse_classes(
        "# folder<TAB>name\nn01\ttench \r\n\nhot_dog\thot dog\n",
        "c",
    )
    .unwrap();
    assert_eq!(
        tsv,
        [
            ("n01".into(), "tench".into()),
            ("hot_dog".into(), "hot dog".into())
        ]
    );
    let json = parse_classes("{\"n01\": \"tench\", \"hot_dog\": \"hot dog\"}", "c").unwrap();
    assert_eq!(json.len(), 2);
    assert!(json.contains(&("n01".into(), "tench".into())));
    let e = parse_classes("n01 tench\n", "c.tsv")
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("c.tsv, line 1") && e.contains("folder<TAB>class name"),
        "{e}"
    );
    assert!(parse_classes("a\tx\na\ty\n", "c")
        .unwrap_err()
        .to_string()
        .contains("twice"));
    assert!(parse_classes("{\"a\": 3}", "c").is_err());
    assert!(parse_classes("a\t \n", "c")
        .unwrap_err()
        .to_string()
        .contains("empty name"));
}

#[test]
fn image_folder_follows_torchvision() {
    let d = temp("zeroshot-folder");
    for p in [
        "b_b/z.png",
        "b_b/sub/a.png",
        "b_b/sub/deeper/c.png",
        "b_b/sub-x/a.PNG",
        "a/x.jpg",
        "a/readme.txt",
        ".hidden/x.png",
    ] {
        let p = d.join(p);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, b"").unwrap();
    }
    std::fs::create_dir_all(d.join("empty")).unwrap();
    let f = ImageFolder::read(&d, &[("a".into(), "apple".into())]).unwrap();
    let names: Vec<(&str, &str)> = f
        .classes
        .iter()
        .map(|c| (c.folder.as_str(), c.name.as_str()))
        .collect();
    assert_eq!(names, [("a", "apple"), ("b_b", "b b"), ("empty", "empty")]);
    let files: Vec<(String, usize)> = f
        .samples
        .iter()
        .map(|(p, k)| (slash(p.strip_prefix(&d).unwrap()), *k))
        .collect();
    // sorted(os.walk(...)): folders in the order of their whole paths
    // ("b_b/sub-x" before "b_b/sub/deeper" as '-' < '/'), each one's files
    // by name.
    let want = [
        ("a/x.jpg", 0),
        ("b_b/z.png", 1),
        ("b_b/sub/a.png", 1),
        ("b_b/sub-x/a.PNG", 1),
        ("b_b/sub/deeper/c.png", 1),
    ];
    let want: Vec<(String, usize)> = want.iter().map(|(p, k)| (p.to_string(), *k)).collect();
    assert_eq!(files, want);
}

#[test]
fn metrics_as_clip_benchmark() {
    // 6 classes, 5 pictures; class 5 has none (left out of the mean recall).
    let logits = vec![
        vec![9.0, 1.0, 2.0, 3.0, 4.0, 5.0], // label 0: right
        vec![9.0, 1.0, 2.0, 3.0, 4.0, 5.0], // label 1: wrong, class 1 ranked last: not in top-5
        vec![1.0, 9.0, 8.0, 0.0, 0.0, 0.0], // label 2: wrong, 2nd
        vec![5.0, 5.0, 1.0, 1.0, 1.0, 1.0], // label 1: a tie goes to the lower index (0): wrong, 2nd
        vec![0.0, 0.0, 0.0, 0.0, 7.0, 0.0], // label 4: right
    ];
    let labels = [0, 1, 2, 1, 4];
    let m = metrics(&logits, &labels, 6);
    assert_eq!(m.predictions, [0, 0, 1, 0, 4]);
    assert!((m.top1 - 2.0 / 5.0).abs() < 1e-12);
    assert!((m.top5.unwrap() - 4.0 / 5.0).abs() < 1e-12);
    // recalls: class 0: 1, class 1: 0/2, class 2: 0, class 4: 1 -> mean 0.5
    assert!((m.mean_per_class_recall - 0.5).abs() < 1e-12);
    assert_eq!(m.per_class[1].images, 2);
    assert_eq!(m.per_class[1].confusions, [(0, 2)]);
    assert_eq!(m.per_class[5].recall(), None);
    let worst = zeroshot::worst_classes(&m);
    assert_eq!(
        worst,
        [1, 2, 0, 4],
        "worst recall first, more pictures first on ties"
    );
    // Fewer than 5 classes: no top-5.
    assert_eq!(metrics(&[vec![1.0, 2.0]], &[1], 2).top5, None);
}

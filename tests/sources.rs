//! Data sources: COCO 2017 captions, CSV / JSON-lines tables, sidecar
//! caption folders, the held-out split, and the built-in demo dataset.

use clip_wgpu::data::demo;
use clip_wgpu::data::sources::{
    coco, parse_csv, sidecar_folder, split_holdout, table, Example, ImageSource, Split,
};
use std::collections::HashSet;
use std::path::{Path, PathBuf};

/// A fresh, empty folder under the target dir for one test.
fn temp_dir(name: &str) -> PathBuf {
    let d = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("sources-{name}"));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn write_png(path: &Path, rgb: [u8; 3]) {
    image::RgbImage::from_pixel(5, 4, image::Rgb(rgb))
        .save(path)
        .unwrap();
}

fn file_of(e: &Example) -> &Path {
    match &e.image {
        ImageSource::File(p) => p,
        ImageSource::Demo(_) | ImageSource::TarMember { .. } => panic!("not a file"),
    }
}

#[test]
fn coco_mini_layout() {
    let d = temp_dir("coco");
    std::fs::create_dir_all(d.join("annotations")).unwrap();
    std::fs::create_dir_all(d.join("val2017")).unwrap();
    for (i, id) in [139u64, 285, 632].iter().enumerate() {
        write_png(
            &d.join(format!("val2017/{id:012}.jpg")),
            [i as u8 * 80, 10, 20],
        );
    }
    let json = serde_json::json!({
        "info": {"year": 2017},
        "images": [
            {"id": 139, "file_name": "000000000139.jpg", "height": 4, "width": 5},
            {"id": 285, "file_name": "000000000285.jpg", "height": 4, "width": 5},
            {"id": 632, "file_name": "000000000632.jpg", "height": 4, "width": 5}
        ],
        "annotations": [
            {"image_id": 285, "id": 1, "caption": "A big bear."},
            {"image_id": 139, "id": 2, "caption": "A living room. "},
            {"image_id": 632, "id": 3, "caption": "A bedroom."},
            {"image_id": 999, "id": 4, "caption": "An orphan caption."},
            {"image_id": 139, "id": 5, "caption": "A room with a TV."},
            {"image_id": 285, "id": 6, "caption": "A brown bear sitting."},
            {"image_id": 632, "id": 7, "caption": "   "},
            {"image_id": 632, "id": 8, "caption": "A bed and a window."}
        ]
    });
    std::fs::write(
        d.join("annotations/captions_val2017.json"),
        json.to_string(),
    )
    .unwrap();
    let ds = coco(&d, Split::Validation).unwrap();
    let got: Vec<(u64, &str)> = ds
        .examples
        .iter()
        .map(|e| (e.image_id, e.caption.as_str()))
        .collect();
    assert_eq!(
        got,
        [
            (285, "A big bear."),
            (139, "A living room. "),
            (632, "A bedroom."),
            (139, "A room with a TV."),
            (285, "A brown bear sitting."),
            (632, "A bed and a window."),
        ]
    );
    assert_eq!(ds.num_images(), 3);
    assert_eq!(file_of(&ds.examples[0]), d.join("val2017/000000000285.jpg"));
    assert!(file_of(&ds.examples[0]).is_file());
    assert_eq!(ds.skipped.len(), 2);
    assert!(
        ds.skipped[0].place.ends_with("annotations[3]"),
        "{:?}",
        ds.skipped
    );
    assert!(ds.skipped[0].reason.contains("999"));
    assert!(ds.skipped[1].reason.contains("empty caption"));
    let summary = ds.skip_summary("COCO val").unwrap();
    assert!(summary.contains("skipped 2 entries"), "{summary}");

    // The train split is not there: the message names the file and layout.
    let err = format!("{:#}", coco(&d, Split::Train).unwrap_err());
    assert!(err.contains("captions_train2017.json"), "{err}");
    assert!(err.contains("annotations_trainval2017.zip"), "{err}");

    // Bad JSON and missing keys name the file.
    std::fs::create_dir_all(d.join("train2017")).unwrap();
    let train = d.join("annotations/captions_train2017.json");
    std::fs::write(&train, "{\"images\": [").unwrap();
    let err = format!("{:#}", coco(&d, Split::Train).unwrap_err());
    assert!(
        err.contains("captions_train2017.json") && err.contains("JSON"),
        "{err}"
    );
    std::fs::write(&train, "{\"images\": [], \"info\": {}}").unwrap();
    let err = format!("{:#}", coco(&d, Split::Train).unwrap_err());
    assert!(
        err.contains("\"annotations\"") && err.contains("captions_train2017.json"),
        "{err}"
    );
    assert!(err.contains("images, info"), "{err}");
}

#[test]
fn coco_missing_image_folder() {
    let d = temp_dir("coco-noimages");
    std::fs::create_dir_all(d.join("annotations")).unwrap();
    std::fs::write(
        d.join("annotations/captions_train2017.json"),
        "{\"images\": [], \"annotations\": []}",
    )
    .unwrap();
    let err = format!("{:#}", coco(&d, Split::Train).unwrap_err());
    assert!(
        err.contains("train2017") && err.contains("does not exist"),
        "{err}"
    );
}

#[test]
fn csv_rfc4180() {
    let text =
        "\u{feff}a,b\r\n\"x, y\",\"say \"\"hi\"\"\"\r\n\r\n\"two\nlines\",plain\rlast,\"\"\n";
    // (The BOM is stripped by `table`, not by `parse_csv`.)
    let recs = parse_csv(text.trim_start_matches('\u{feff}')).unwrap();
    assert_eq!(
        recs,
        [
            (1, vec!["a".to_string(), "b".into()]),
            (2, vec!["x, y".to_string(), "say \"hi\"".into()]),
            (4, vec!["two\nlines".to_string(), "plain".into()]),
            (6, vec!["last".to_string(), "".into()]),
        ]
    );
    // No final newline; empty fields; a quote inside an unquoted field.
    assert_eq!(
        parse_csv("p,,q\n5\"6,\"a\"b,").unwrap(),
        [
            (1, vec!["p".to_string(), "".into(), "q".into()]),
            (2, vec!["5\"6".to_string(), "ab".into(), "".into()]),
        ]
    );
    let err = parse_csv("a,b\n1,\"open\n\n").unwrap_err();
    assert_eq!(err.0, 2, "{err:?}");
}

#[test]
fn csv_table() {
    let d = temp_dir("csv");
    std::fs::create_dir_all(d.join("img")).unwrap();
    write_png(&d.join("img/a.png"), [1, 2, 3]);
    let abs = d.join("img/b.png");
    write_png(&abs, [4, 5, 6]);
    let csv = format!(
        "\u{feff}image_path,caption,other\r\n\
         img/a.png,\"a cat, sitting\",1\r\n\
         {},\"a \"\"quoted\"\" dog\nover two lines\",2\r\n\
         img/a.png,   ,3\r\n\
         img/a.png,another caption of a,4\r\n\
         ,no image,5\r\n\
         \r\n",
        abs.display()
    );
    let f = d.join("data.csv");
    std::fs::write(&f, csv).unwrap();
    let ds = table(&f, "image_path", "caption").unwrap();
    let got: Vec<(PathBuf, &str, u64)> = ds
        .examples
        .iter()
        .map(|e| (file_of(e).to_path_buf(), e.caption.as_str(), e.image_id))
        .collect();
    assert_eq!(
        got,
        [
            (d.join("img/a.png"), "a cat, sitting", 0),
            (abs.clone(), "a \"quoted\" dog\nover two lines", 1),
            (d.join("img/a.png"), "another caption of a", 0),
        ]
    );
    let lines: Vec<&str> = ds.skipped.iter().map(|s| s.place.as_str()).collect();
    assert!(lines[0].ends_with("data.csv:5"), "{lines:?}");
    assert!(lines[1].ends_with("data.csv:7"), "{lines:?}");
    assert!(ds.skipped[0].reason.contains("empty caption"));
    assert!(ds.skipped[1].reason.contains("empty image path"));

    // A missing column names the file, the column and the columns there are.
    let err = format!("{:#}", table(&f, "image", "caption").unwrap_err());
    assert!(err.contains("data.csv"), "{err}");
    assert!(err.contains("\"image\""), "{err}");
    assert!(
        err.contains("\"image_path\", \"caption\", \"other\""),
        "{err}"
    );
    let err = format!("{:#}", table(&f, "image_path", "Caption ").unwrap_err());
    assert!(err.contains("did you mean \"caption\""), "{err}");

    // A row with a wrong field count names the line.
    let bad = d.join("bad.csv");
    std::fs::write(&bad, "image,caption\na.png,ok\nb.png,one, two\n").unwrap();
    let err = format!("{:#}", table(&bad, "image", "caption").unwrap_err());
    assert!(
        err.contains("bad.csv:3") && err.contains("3 fields"),
        "{err}"
    );

    // Unknown extension.
    let tsv = d.join("data.tsv");
    std::fs::write(&tsv, "a\tb\n").unwrap();
    assert!(format!("{:#}", table(&tsv, "a", "b").unwrap_err()).contains(".csv"));
}

#[test]
fn jsonl_table() {
    let d = temp_dir("jsonl");
    std::fs::create_dir_all(d.join("pics")).unwrap();
    let f = d.join("train.jsonl");
    let text = r#"{"image": "pics/1.png", "text": "first"}

{"image": "pics/2.png", "text": 42}
{"image": "pics/3.png", "text": null}
{"image": "pics/1.png", "text": ["again 1", "", "and again"]}
{"image": "pics/4.png"}
{"image": "pics/5.png", "text": {"en": "x"}}
"#;
    std::fs::write(&f, text).unwrap();
    let ds = table(&f, "image", "text").unwrap();
    let got: Vec<(PathBuf, &str, u64)> = ds
        .examples
        .iter()
        .map(|e| (file_of(e).to_path_buf(), e.caption.as_str(), e.image_id))
        .collect();
    assert_eq!(
        got,
        [
            (d.join("pics/1.png"), "first", 0),
            (d.join("pics/2.png"), "42", 1),
            (d.join("pics/1.png"), "again 1", 0),
            (d.join("pics/1.png"), "and again", 0),
        ]
    );
    let places: Vec<String> = ds
        .skipped
        .iter()
        .map(|s| s.place.rsplit(':').next().unwrap().to_string())
        .collect();
    assert_eq!(places, ["4", "5", "6", "7"], "{:?}", ds.skipped);

    // Missing column: lists the keys seen.
    let err = format!("{:#}", table(&f, "image_path", "text").unwrap_err());
    assert!(
        err.contains("train.jsonl") && err.contains("\"image\", \"text\""),
        "{err}"
    );

    // A broken line names file and line.
    let bad = d.join("bad.json");
    std::fs::write(
        &bad,
        "{\"image\": \"a.png\", \"text\": \"ok\"}\n{\"image\": \n",
    )
    .unwrap();
    let err = format!("{:#}", table(&bad, "image", "text").unwrap_err());
    assert!(err.contains("bad.json:2"), "{err}");
    std::fs::write(&bad, "{\"image\": \"a.png\", \"text\": \"ok\"}\n[1, 2]\n").unwrap();
    let err = format!("{:#}", table(&bad, "image", "text").unwrap_err());
    assert!(
        err.contains("bad.json:2") && err.contains("not a JSON object"),
        "{err}"
    );

    // A single JSON array of objects also works.
    let arr = d.join("arr.json");
    std::fs::write(
        &arr,
        r#"[{"image": "/abs/x.png", "text": "x"}, {"image": "y.png", "text": "y"}]"#,
    )
    .unwrap();
    let ds = table(&arr, "image", "text").unwrap();
    assert_eq!(file_of(&ds.examples[0]), Path::new("/abs/x.png"));
    assert_eq!(file_of(&ds.examples[1]), d.join("y.png"));
}

#[test]
fn sidecar_captions() {
    let d = temp_dir("sidecar");
    std::fs::create_dir_all(d.join("b/inner")).unwrap();
    std::fs::create_dir_all(d.join("a")).unwrap();
    write_png(&d.join("a/crane.png"), [1, 1, 1]);
    std::fs::write(
        d.join("a/crane.txt"),
        "\n  A crowned crane.  \r\nfr.utf8=Une grue.\n",
    )
    .unwrap();
    write_png(&d.join("a/lonely.png"), [1, 1, 1]);
    std::fs::write(d.join("b/Z.JPG"), b"not decoded here").unwrap();
    std::fs::write(d.join("b/Z.txt"), b"caf\xe9 latte\n").unwrap();
    std::fs::write(d.join("b/inner/x.webp"), b"not decoded here").unwrap();
    std::fs::write(d.join("b/inner/x.txt"), "an inner picture").unwrap();
    write_png(&d.join("b/empty.png"), [1, 1, 1]);
    std::fs::write(d.join("b/empty.txt"), "\n   \n").unwrap();
    std::fs::write(d.join("b/notes.txt"), "not a caption").unwrap();
    std::fs::write(d.join("top.bmp"), b"not decoded here").unwrap();
    std::fs::write(d.join("top.txt"), "top level").unwrap();

    let ds = sidecar_folder(&d).unwrap();
    let got: Vec<(PathBuf, &str, u64)> = ds
        .examples
        .iter()
        .map(|e| (file_of(e).to_path_buf(), e.caption.as_str(), e.image_id))
        .collect();
    assert_eq!(
        got,
        [
            (d.join("a/crane.png"), "A crowned crane.", 0),
            (d.join("b/Z.JPG"), "caf\u{fffd} latte", 1),
            (d.join("b/inner/x.webp"), "an inner picture", 2),
            (d.join("top.bmp"), "top level", 3),
        ]
    );
    let skipped: Vec<&str> = ds.skipped.iter().map(|s| s.place.as_str()).collect();
    assert_eq!(skipped.len(), 2, "{skipped:?}");
    assert!(skipped[0].ends_with("lonely.png") && ds.skipped[0].reason.contains("lonely.txt"));
    assert!(skipped[1].ends_with("empty.png") && ds.skipped[1].reason.contains("is empty"));
    assert!(sidecar_folder(&d.join("nope")).is_err());
}

/// Debian's tuxpaint-stamps-default, when installed: ~800 PNGs with a
/// caption file each.
#[test]
fn tuxpaint_stamps() {
    let dir = Path::new("/usr/share/tuxpaint/stamps");
    if !dir.is_dir() {
        eprintln!("skipping: {} not installed", dir.display());
        return;
    }
    let ds = sidecar_folder(dir).unwrap();
    eprintln!(
        "tuxpaint stamps: {} examples, {} skipped; first: {:?}",
        ds.examples.len(),
        ds.skipped.len(),
        ds.examples.first().map(|e| &e.caption)
    );
    if let Some(s) = ds.skip_summary("tuxpaint") {
        eprintln!("{s}");
    }
    assert!(ds.examples.len() > 500);
    assert!(ds.examples.iter().all(|e| !e.caption.contains("utf8=")));
}

#[test]
fn holdout_keeps_images_together() {
    let ex: Vec<Example> = (0..200)
        .map(|i| Example {
            image: ImageSource::Demo(i),
            caption: format!("caption {i}"),
            image_id: i / 5 * 7, // 40 images, 5 captions each
        })
        .collect();
    let (train, val) = split_holdout(ex.clone(), 0.1, 3);
    let (train2, val2) = split_holdout(ex.clone(), 0.1, 3);
    assert_eq!((&train, &val), (&train2, &val2));
    assert_eq!(val.len(), 4 * 5);
    assert_eq!(train.len() + val.len(), 200);
    let tid: HashSet<u64> = train.iter().map(|e| e.image_id).collect();
    assert!(val.iter().all(|e| !tid.contains(&e.image_id)));
    // Input order is kept on both sides.
    let pos = |e: &Example| ex.iter().position(|x| x == e).unwrap();
    assert!(train.windows(2).all(|w| pos(&w[0]) < pos(&w[1])));
    assert!(val.windows(2).all(|w| pos(&w[0]) < pos(&w[1])));
    // Another seed, another split.
    let (_, val3) = split_holdout(ex.clone(), 0.1, 4);
    assert_ne!(val, val3);
    // Edges.
    assert_eq!(split_holdout(ex.clone(), 0.0, 1).1.len(), 0);
    assert_eq!(split_holdout(ex.clone(), 0.001, 1).1.len(), 5);
    assert_eq!(split_holdout(ex.clone(), 0.999, 1).0.len(), 5);
    assert_eq!(split_holdout(ex.clone(), f64::NAN, 1).1.len(), 0);
}

#[test]
fn demo_is_deterministic() {
    let (a, ca) = demo::render(12345, 64);
    let (b, cb) = demo::render(12345, 64);
    assert_eq!(a, b);
    assert_eq!(ca, cb);
    assert_eq!(ca, demo::caption_of(12345));
    let (c, _) = demo::render(12346, 64);
    assert_ne!(a, c);
    // Pinned pixels: the same on every platform.
    let h = a.as_raw().iter().fold(0xcbf29ce484222325u64, |h, &x| {
        (h ^ x as u64).wrapping_mul(0x100000001b3)
    });
    eprintln!("demo 12345: {ca:?}, fnv {h:#x}");
    assert_eq!(h, DEMO_12345_FNV, "{ca}");

    let ex = demo::examples(50, 7);
    assert_eq!(ex, demo::examples(50, 7));
    assert_ne!(ex, demo::examples(50, 8));
    for (i, e) in ex.iter().enumerate() {
        assert_eq!(e.image_id, i as u64);
        let ImageSource::Demo(s) = e.image else {
            panic!()
        };
        assert_eq!(e.caption, demo::render(s, 16).1);
    }
}

const DEMO_12345_FNV: u64 = 0x2c5ee39066853ce9;

#[test]
fn demo_captions_and_held_out() {
    let all: HashSet<String> = (0..demo::NUM_CAPTIONS).map(demo::caption).collect();
    assert_eq!(all.len(), demo::NUM_CAPTIONS);
    assert_eq!(demo::caption(0), "a red circle on the left");
    assert!(all.contains("an orange cross in the middle"));

    let held = demo::held_out(1000, 1);
    assert_eq!(held.len(), demo::NUM_CAPTIONS);
    let caps: HashSet<&str> = held.iter().map(|e| e.caption.as_str()).collect();
    assert_eq!(caps.len(), held.len(), "held-out captions must be unique");
    let small = demo::held_out(40, 1);
    assert_eq!(small.len(), 40);
    assert_eq!(small[..], held[..40]);
    let caps: HashSet<&str> = small.iter().map(|e| e.caption.as_str()).collect();
    assert_eq!(caps.len(), 40);
    // Held-out pictures differ from training pictures.
    let train: HashSet<ImageSource> = demo::examples(5000, 1)
        .into_iter()
        .map(|e| e.image)
        .collect();
    assert!(held.iter().all(|e| !train.contains(&e.image)));
    for e in &held {
        let ImageSource::Demo(s) = e.image else {
            panic!()
        };
        assert_eq!(demo::caption_of(s), e.caption);
    }
    // The shape is drawn in the named colour: the most saturated pixels are
    // near the colour's base.
    for idx in 0..demo::NUM_CAPTIONS {
        let (c, _, _) = demo::attributes(idx);
        let (img, _) = demo::render(idx as u64 + 120 * 99, 64);
        let base = demo::COLOURS[c].1;
        let n = img
            .pixels()
            .filter(|p| (0..3).all(|k| (p.0[k] as i32 - base[k] as i32).abs() <= 12))
            .count();
        assert!(n > 80, "caption {idx}: only {n} shape pixels");
    }
}

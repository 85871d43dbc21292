//! Retrieval recall@K on hand-made cases with known answers (and against a
//! brute-force sort), the JSON-lines metrics log, and the loss chart PNG.

use clip_wgpu::train::metrics::{
    loss_curve_png, loss_points, recall_at_k, recall_from_similarity, MetricsLog, Recall,
    TrainRecord, CHART_HEIGHT, CHART_WIDTH, EVAL_COLOR, TRAIN_COLOR,
};
use serde_json::Value;
use std::path::PathBuf;

fn temp_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("clip-wgpu-metrics-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn v(x: &[f32]) -> Vec<f32> {
    x.to_vec()
}

/// 3 images, 5 captions. Similarities (image rows, text columns):
///
/// ```text
///            t0(A) t1(A) t2(B) t3(C) t4(C)
/// image A     .8    0     .6    .8    0
/// image B     .6    .6    .8    0     .8
/// image C     0     .8    0     .6    .6
/// ```
/// Image to text: A's best caption t0 ties with t3 and wins on index (rank
/// 0); B's t2 ties with t4 and wins (rank 0); C's best t3 is behind t1
/// (rank 1). Text to image: t0 rank 0, t1 rank 2, t2 rank 0, t3 rank 1,
/// t4 rank 1.
#[allow(clippy::type_complexity)]
fn three_images() -> (Vec<Vec<f32>>, Vec<Vec<f32>>, Vec<u64>, Vec<u64>) {
    let images = vec![
        v(&[1.0, 0.0, 0.0]),
        v(&[0.0, 1.0, 0.0]),
        v(&[0.0, 0.0, 1.0]),
    ];
    let texts = vec![
        v(&[0.8, 0.6, 0.0]),
        v(&[0.0, 0.6, 0.8]),
        v(&[0.6, 0.8, 0.0]),
        v(&[0.8, 0.0, 0.6]),
        v(&[0.0, 0.8, 0.6]),
    ];
    (images, texts, vec![7, 7, 3, 11, 11], vec![7, 3, 11])
}

#[test]
fn recall_hand_made() {
    let (images, texts, of_texts, of_images) = three_images();
    let r = recall_at_k(&images, &texts, &of_texts, &of_images, &[1, 2, 3, 10]).unwrap();
    assert_eq!(
        r,
        Recall {
            i2t: vec![(1, 2.0 / 3.0), (2, 1.0), (3, 1.0), (10, 1.0)],
            t2i: vec![(1, 0.4), (2, 0.8), (3, 1.0), (10, 1.0)],
        }
    );
    assert_eq!(
        r.named()
            .iter()
            .map(|(k, _)| k.as_str())
            .collect::<Vec<_>>(),
        [
            "i2t_recall@1",
            "i2t_recall@2",
            "i2t_recall@3",
            "i2t_recall@10",
            "t2i_recall@1",
            "t2i_recall@2",
            "t2i_recall@3",
            "t2i_recall@10"
        ]
    );

    // The same from the similarity matrix.
    let mut sims = Vec::new();
    for im in &images {
        for t in &texts {
            sims.push(im.iter().zip(t).map(|(a, b)| a * b).sum::<f32>());
        }
    }
    let r2 = recall_from_similarity(&sims, 3, &of_texts, &of_images, &[1, 2, 3, 10]).unwrap();
    assert_eq!(r, r2);

    // Text-to-image ties: a caption equally close to two images ranks the
    // lower image index first, whichever of the two it belongs to.
    let sims = [
        // images 0, 1; one caption of image 1, equally close to both.
        0.5f32, 0.5,
    ];
    let r = recall_from_similarity(&sims, 2, &[9], &[4, 9], &[1, 2]).unwrap();
    assert_eq!(
        r.t2i,
        vec![(1, 0.0), (2, 1.0)],
        "tie: the lower image index ranks first"
    );
    let r = recall_from_similarity(&sims, 2, &[4], &[4, 9], &[1]).unwrap();
    assert_eq!(r.t2i, vec![(1, 1.0)]);
    // Image 1 has no caption: not counted in image-to-text.
    assert_eq!(r.i2t, vec![(1, 1.0)]);
}

/// Brute force: sort every row by (score desc, index asc).
fn brute(sims: &[f64], n_img: usize, owner: &[usize], ks: &[usize]) -> Recall {
    let n_txt = owner.len();
    let mut i2t_hits = vec![0usize; ks.len()];
    let mut n_with = 0;
    for i in 0..n_img {
        if !owner.contains(&i) {
            continue;
        }
        n_with += 1;
        let mut order: Vec<usize> = (0..n_txt).collect();
        order.sort_by(|&a, &b| {
            sims[i * n_txt + b]
                .partial_cmp(&sims[i * n_txt + a])
                .unwrap()
                .then(a.cmp(&b))
        });
        let first = order.iter().position(|&t| owner[t] == i).unwrap();
        for (h, &k) in i2t_hits.iter_mut().zip(ks) {
            *h += usize::from(first < k);
        }
    }
    let mut t2i_hits = vec![0usize; ks.len()];
    for t in 0..n_txt {
        let mut order: Vec<usize> = (0..n_img).collect();
        order.sort_by(|&a, &b| {
            sims[b * n_txt + t]
                .partial_cmp(&sims[a * n_txt + t])
                .unwrap()
                .then(a.cmp(&b))
        });
        let pos = order.iter().position(|&i| i == owner[t]).unwrap();
        for (h, &k) in t2i_hits.iter_mut().zip(ks) {
            *h += usize::from(pos < k);
        }
    }
    Recall {
        i2t: ks
            .iter()
            .zip(&i2t_hits)
            .map(|(&k, &h)| (k, h as f64 / n_with as f64))
            .collect(),
        t2i: ks
            .iter()
            .zip(&t2i_hits)
            .map(|(&k, &h)| (k, h as f64 / n_txt as f64))
            .collect(),
    }
}

#[test]
fn recall_matches_brute_force_with_ties() {
    let mut seed = 0x1234_5678_9abc_def0u64;
    let mut rnd = || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    for case in 0..6 {
        let n_img = 5 + case * 7;
        let dim = 3 + case;
        // Coarse values make many exact ties.
        let mut emb = |n: usize| -> Vec<Vec<f32>> {
            (0..n)
                .map(|_| {
                    let x: Vec<f32> = (0..dim).map(|_| (rnd() % 5) as f32 - 2.0).collect();
                    let norm = x.iter().map(|a| a * a).sum::<f32>().sqrt().max(1.0);
                    x.iter().map(|a| a / norm).collect()
                })
                .collect()
        };
        let images = emb(n_img);
        let owner: Vec<usize> = (0..n_img * 3)
            .map(|t| (t * 7 + t / 3) % n_img)
            .filter(|i| i % 4 != 3)
            .collect();
        let texts = emb(owner.len());
        let ids: Vec<u64> = (0..n_img as u64).map(|i| 1000 + i * 17).collect();
        let of_texts: Vec<u64> = owner.iter().map(|&i| ids[i]).collect();
        let ks = [1, 2, 5, 10];
        let got = recall_at_k(&images, &texts, &of_texts, &ids, &ks).unwrap();
        let mut sims = Vec::new();
        for im in &images {
            for t in &texts {
                sims.push(
                    im.iter()
                        .zip(t)
                        .map(|(a, b)| *a as f64 * *b as f64)
                        .sum::<f64>(),
                );
            }
        }
        let want = brute(&sims, n_img, &owner, &ks);
        assert_eq!(got, want, "case {case}");
    }
}

#[test]
fn recall_errors() {
    let (images, texts, of_texts, of_images) = three_images();
    let e = recall_at_k(&images, &texts, &of_texts, &[7, 7, 11], &[1]).unwrap_err();
    assert!(e.to_string().contains("twice"), "{e}");
    let e = recall_at_k(&images, &texts, &[7, 7, 3, 11, 99], &of_images, &[1]).unwrap_err();
    assert!(e.to_string().contains("99"), "{e}");
    let e = recall_at_k(&images, &texts, &of_texts, &of_images, &[0]).unwrap_err();
    assert!(e.to_string().contains("at least 1"), "{e}");
    let mut bad = texts.clone();
    bad[2] = v(&[1.0, 0.0]);
    let e = recall_at_k(&images, &bad, &of_texts, &of_images, &[1]).unwrap_err();
    assert!(e.to_string().contains("text embedding 2"), "{e}");
    let e = recall_from_similarity(&[f32::NAN, 0.0], 1, &[1, 1], &[1], &[1]).unwrap_err();
    assert!(e.to_string().contains("NaN"), "{e}");
}

#[test]
fn metrics_log_appends_json_lines() {
    let dir = temp_dir("log");
    let path = dir.join("sub/metrics.jsonl");
    {
        let mut log = MetricsLog::open(&path).unwrap();
        for step in [10u64, 20, 30] {
            log.train(&TrainRecord {
                step,
                epoch: step as f64 / 40.0,
                loss: 4.0 - step as f64 / 10.0,
                learning_rate: 5e-5,
                grad_norm: Some(1.5),
                images_per_s: Some(123.0),
            })
            .unwrap();
            // Visible on disk right away.
            assert_eq!(
                MetricsLog::read(&path).unwrap().len() as u64,
                step / 10 + (step > 20) as u64
            );
            if step == 20 {
                log.eval(
                    20,
                    0.5,
                    &[
                        ("eval_loss".into(), 2.5),
                        ("eval_i2t_recall@1".into(), 0.25),
                    ],
                )
                .unwrap();
            }
        }
        log.train(&TrainRecord {
            step: 31,
            epoch: 0.8,
            loss: f64::NAN,
            learning_rate: 1e-5,
            grad_norm: None,
            images_per_s: None,
        })
        .unwrap();
    }
    let text = std::fs::read_to_string(&path).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 5);
    assert_eq!(
        lines[0],
        r#"{"loss":3.0,"grad_norm":1.5,"learning_rate":0.00005,"images_per_s":123.0,"epoch":0.25,"step":10}"#
    );
    assert_eq!(
        lines[2],
        r#"{"eval_loss":2.5,"eval_i2t_recall@1":0.25,"epoch":0.5,"step":20}"#
    );
    assert_eq!(
        lines[4],
        r#"{"loss":null,"learning_rate":0.00001,"epoch":0.8,"step":31}"#
    );

    // A crash mid-line: the torn line is skipped and the next record starts
    // on a fresh line.
    {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap();
        f.write_all(br#"{"loss":1.0,"le"#).unwrap();
    }
    let mut log = MetricsLog::open(&path).unwrap();
    log.eval(40, 1.0, &[("eval_loss".into(), 1.75)]).unwrap();
    drop(log);
    let records = MetricsLog::read(&path).unwrap();
    assert_eq!(records.len(), 6);
    let (train, eval) = loss_points(&records);
    assert_eq!(train, vec![(10.0, 3.0), (20.0, 2.0), (30.0, 1.0)]);
    assert_eq!(eval, vec![(20.0, 2.5), (40.0, 1.75)]);

    // Resuming from step 20 drops what came later.
    assert_eq!(MetricsLog::truncate_after(&path, 20).unwrap(), 3);
    let records = MetricsLog::read(&path).unwrap();
    assert_eq!(
        records
            .iter()
            .map(|r| r["step"].as_u64().unwrap())
            .collect::<Vec<_>>(),
        [10, 20, 20]
    );
    assert_eq!(records[2]["eval_loss"], Value::from(2.5));
    assert_eq!(
        MetricsLog::read(&dir.join("missing.jsonl")).unwrap().len(),
        0
    );
    std::fs::remove_dir_all(&dir).ok();
}

fn count_color(img: &image::RgbImage, c: [u8; 3]) -> usize {
    img.pixels().filter(|p| p.0 == c).count()
}

#[test]
fn loss_chart_png() {
    let dir = temp_dir("png");
    // A CLIP-like curve: ln(64) falling with noise, evaluated every 200
    // steps.
    let train: Vec<(f64, f64)> = (1..=120)
        .map(|i| {
            let s = (i * 25) as f64;
            let noise = ((i * 7919) % 13) as f64 / 13.0 - 0.5;
            (s, 0.6 + 3.6 * (-s / 900.0).exp() + 0.15 * noise)
        })
        .collect();
    let eval: Vec<(f64, f64)> = (1..=15)
        .map(|i| {
            (
                (i * 200) as f64,
                0.8 + 3.2 * (-(i as f64) * 200.0 / 1000.0).exp(),
            )
        })
        .collect();
    let path = dir.join("charts/loss.png");
    loss_curve_png(&path, &train, &eval).unwrap();
    let bytes = std::fs::read(&path).unwrap();
    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
    let img = image::load_from_memory(&bytes).unwrap().to_rgb8();
    assert_eq!((img.width(), img.height()), (CHART_WIDTH, CHART_HEIGHT));
    let (t, e) = (
        count_color(&img, TRAIN_COLOR),
        count_color(&img, EVAL_COLOR),
    );
    println!("train-colour pixels {t}, eval-colour pixels {e}");
    assert!(t > 1000, "train curve pixels: {t}");
    assert!(e > 15 * 30, "eval point pixels: {e}");
    // Curve pixels are inside the plot: none in the title band.
    for y in 0..40 {
        for x in 0..CHART_WIDTH {
            assert_ne!(img.get_pixel(x, y).0, TRAIN_COLOR);
        }
    }
    // Atomic: nothing left beside it.
    let names: Vec<String> = std::fs::read_dir(dir.join("charts"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, ["loss.png"]);
    if let Ok(keep) = std::env::var("CLIP_WGPU_KEEP_CHART") {
        std::fs::copy(&path, &keep).unwrap();
        let small: Vec<(f64, f64)> = (1..=40)
            .map(|i| (i as f64, 0.02 + 0.06 / i as f64))
            .collect();
        loss_curve_png(
            &PathBuf::from(format!("{keep}.small.png")),
            &small,
            &[(40.0, 0.035)],
        )
        .unwrap();
        loss_curve_png(&PathBuf::from(format!("{keep}.empty.png")), &[], &[]).unwrap();
    }

    // Degenerate inputs still give a chart.
    loss_curve_png(&path, &[], &[]).unwrap();
    loss_curve_png(&path, &[(5.0, 2.0)], &[]).unwrap();
    loss_curve_png(
        &path,
        &[(1.0, f64::NAN), (2.0, 3.0), (3.0, 3.0)],
        &[(3.0, 3.0)],
    )
    .unwrap();
    let img = image::open(&path).unwrap().to_rgb8();
    assert!(count_color(&img, TRAIN_COLOR) > 50);
    std::fs::remove_dir_all(&dir).ok();
}

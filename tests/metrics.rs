//! Retrieval recall@K on hand-made cases with known answers (and against a
//! brute-force sort), the JSON-lines metrics log, and the loss chart PNG.

use clip_wgpu::train::metrics::{
    loss_chart, loss_curve_png, recall_at_k, recall_from_similarity, ChartData, LossChart,
    MetricsLog, Panel, Recall, TrainRecord, CHART_HEIGHT, CHART_WIDTH, EVAL_COLOR, LR_COLOR,
    TRAIN_COLOR,
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
    let data = ChartData::from_records(&records);
    assert_eq!(data.train_loss, vec![(10.0, 3.0), (20.0, 2.0), (30.0, 1.0)]);
    assert_eq!(data.eval_loss, vec![(20.0, 2.5), (40.0, 1.75)]);
    // The null loss of step 31 is skipped, its learning rate is not.
    assert_eq!(
        data.learning_rate,
        vec![(10.0, 5e-5), (20.0, 5e-5), (30.0, 5e-5), (31.0, 1e-5)]
    );

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

/// Whether a pixel of colour `c` lies within `r` pixels (a square) of `p`.
fn colour_near(img: &image::RgbImage, p: (i32, i32), r: i32, c: [u8; 3]) -> bool {
    (-r..=r).any(|dy| {
        (-r..=r).any(|dx| {
            let (x, y) = (p.0 + dx, p.1 + dy);
            x >= 0
                && y >= 0
                && (x as u32) < img.width()
                && (y as u32) < img.height()
                && img.get_pixel(x as u32, y as u32).0 == c
        })
    })
}

/// Pixels of colour `c` outside `panel`'s plotting area.
fn colour_outside(img: &image::RgbImage, panel: &Panel, c: [u8; 3]) -> usize {
    img.enumerate_pixels()
        .filter(|(x, y, p)| p.0 == c && !panel.contains(*x as i32, *y as i32))
        .count()
}

/// Dark (text or axis) pixels in the rectangle x0..x1, y0..y1.
fn dark_in(img: &image::RgbImage, x0: i32, x1: i32, y0: i32, y1: i32) -> usize {
    img.enumerate_pixels()
        .filter(|(x, y, p)| {
            let (x, y) = (*x as i32, *y as i32);
            x >= x0 && x < x1 && y >= y0 && y < y1 && p.0.iter().all(|&v| v < 110)
        })
        .count()
}

/// The checks every chart passes: its size, and each series' colour only
/// inside its own panel (the rate's also in the legend, in the loss panel).
fn check_layout(chart: &LossChart) {
    let img = &chart.image;
    assert_eq!((img.width(), img.height()), (CHART_WIDTH, CHART_HEIGHT));
    for c in [TRAIN_COLOR, EVAL_COLOR] {
        assert_eq!(colour_outside(img, &chart.loss, c), 0, "{c:?} outside");
    }
    let stray_rate = img
        .enumerate_pixels()
        .filter(|(x, y, p)| {
            let (x, y) = (*x as i32, *y as i32);
            p.0 == LR_COLOR && !chart.loss.contains(x, y) && !chart.learning_rate.contains(x, y)
        })
        .count();
    assert_eq!(stray_rate, 0, "rate colour outside the panels");
    // The loss panel is above the learning-rate panel, over the same steps.
    assert!(chart.loss.origin.1 < chart.learning_rate.corner.1);
    assert_eq!(chart.loss.x, chart.learning_rate.x);
    assert_eq!(chart.loss.origin.0, chart.learning_rate.origin.0);
    assert_eq!(chart.loss.corner.0, chart.learning_rate.corner.0);
}

#[test]
fn loss_chart_png() {
    let dir = temp_dir("png");
    // A CLIP-like curve: ln(64) falling with noise, evaluated every 200
    // steps, under a learning rate warmed up over 300 steps and decayed
    // linearly to 0 at step 3000.
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
    let lr: Vec<(f64, f64)> = train
        .iter()
        .map(|&(s, _)| {
            let r = if s < 300.0 {
                s / 300.0
            } else {
                (3000.0 - s) / 2700.0
            };
            (s, 5e-5 * r)
        })
        .collect();
    let data = ChartData {
        train_loss: train.clone(),
        eval_loss: eval.clone(),
        learning_rate: lr.clone(),
    };
    let path = dir.join("charts/loss.png");
    loss_curve_png(&path, &data).unwrap();
    let bytes = std::fs::read(&path).unwrap();
    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
    let img = image::load_from_memory_with_format(&bytes, image::ImageFormat::Png)
        .unwrap()
        .to_rgb8();
    // The PNG holds the chart exactly.
    let chart = loss_chart(&data).unwrap();
    assert!(img == chart.image, "the PNG differs from the drawn chart");
    check_layout(&chart);
    let (loss, lrp) = (&chart.loss, &chart.learning_rate);
    // Steps from 0 to 3000 with 2% room, losses with 5%.
    assert_eq!(loss.x, -60.0..3060.0);
    assert!(loss.y.start < 0.55 && loss.y.end > 4.0, "{:?}", loss.y);
    assert!(lrp.y.start < 0.0 && lrp.y.start > -5e-6, "{:?}", lrp.y);
    assert!(lrp.y.end >= 5e-5 && lrp.y.end < 6e-5, "{:?}", lrp.y);

    // The curves pass through their points: each training point (but where
    // an evaluation dot covers it) has the training colour within 2 pixels,
    // each evaluation point is the centre of an evaluation dot, each
    // learning rate has the rate's colour within 2 pixels.
    let eval_px: Vec<(i32, i32)> = eval.iter().map(|&(x, y)| loss.pixel(x, y)).collect();
    let mut checked = 0;
    for &(x, y) in &train {
        let p = loss.pixel(x, y);
        if eval_px
            .iter()
            .any(|e| (e.0 - p.0).abs() <= 7 && (e.1 - p.1).abs() <= 7)
        {
            continue;
        }
        assert!(
            colour_near(&img, p, 2, TRAIN_COLOR),
            "train point ({x}, {y}) at pixel {p:?}"
        );
        checked += 1;
    }
    assert!(checked >= 100, "{checked} training points checked");
    for &p in &eval_px {
        assert!(colour_near(&img, p, 0, EVAL_COLOR), "eval point at {p:?}");
        // A dot: its colour 3 pixels away on each side.
        for (dx, dy) in [(3, 0), (-3, 0), (0, 3), (0, -3)] {
            assert!(colour_near(&img, (p.0 + dx, p.1 + dy), 0, EVAL_COLOR));
        }
    }
    for &(x, y) in &lr {
        let p = lrp.pixel(x, y);
        assert!(
            colour_near(&img, p, 2, LR_COLOR),
            "rate point ({x}, {y}) at pixel {p:?}"
        );
    }
    // Nothing in the series' colours far from the data: none under the
    // losses after step 1500 (all above 0.65), none over the rate after step
    // 1000 (below 3.8e-5 there).
    let (l0, l1) = loss.pixel(1500.0, 0.62);
    assert!(loss.origin.1 - l1 > 10, "an empty area to look at");
    for y in l1..loss.origin.1 - 1 {
        for x in l0..loss.corner.0 - 1 {
            let c = img.get_pixel(x as u32, y as u32).0;
            assert!(c != TRAIN_COLOR && c != EVAL_COLOR, "{c:?} at ({x}, {y})");
        }
    }
    let (r0, r1) = lrp.pixel(1000.0, 4.2e-5);
    assert!(r1 - lrp.corner.1 > 10, "an empty area to look at");
    for y in lrp.corner.1 + 1..r1 {
        for x in r0..lrp.corner.0 - 1 {
            assert_ne!(img.get_pixel(x as u32, y as u32).0, LR_COLOR, "({x}, {y})");
        }
    }
    // The legend: the upper right of the loss panel holds no data (losses
    // there would be above 3), yet has the three series' colours and text.
    let (lx, ly) = loss.pixel(2000.0, 3.0);
    let in_box = |c: [u8; 3], x0: i32, y0: i32, x1: i32, y1: i32| {
        (y0..y1).any(|y| (x0..x1).any(|x| img.get_pixel(x as u32, y as u32).0 == c))
    };
    for c in [TRAIN_COLOR, EVAL_COLOR, LR_COLOR] {
        assert!(in_box(c, lx, loss.corner.1, loss.corner.0, ly), "{c:?}");
    }
    assert!(dark_in(&img, lx, loss.corner.0 - 1, loss.corner.1 + 2, ly) > 100);
    // Tick labels and axis names left of and below the panels, and the
    // title above.
    assert!(dark_in(&img, 0, loss.origin.0 - 4, loss.corner.1, loss.origin.1) > 150);
    assert!(dark_in(&img, 0, lrp.origin.0 - 4, lrp.corner.1, lrp.origin.1) > 150);
    assert!(
        dark_in(
            &img,
            lrp.origin.0,
            lrp.corner.0,
            lrp.origin.1 + 4,
            CHART_HEIGHT as i32
        ) > 300
    );
    assert!(dark_in(&img, 0, CHART_WIDTH as i32, 0, loss.corner.1 - 2) > 50);

    // Atomic: nothing left beside it.
    let names: Vec<String> = std::fs::read_dir(dir.join("charts"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, ["loss.png"]);
    if let Ok(keep) = std::env::var("CLIP_WGPU_KEEP_CHART") {
        std::fs::copy(&path, &keep).unwrap();
        let small = ChartData {
            train_loss: (1..=40)
                .map(|i| (i as f64, 0.02 + 0.06 / i as f64))
                .collect(),
            eval_loss: vec![(40.0, 0.035)],
            learning_rate: (1..=40).map(|i| (i as f64, 1e-3)).collect(),
        };
        loss_curve_png(&PathBuf::from(format!("{keep}.small.png")), &small).unwrap();
        loss_curve_png(
            &PathBuf::from(format!("{keep}.empty.png")),
            &ChartData::default(),
        )
        .unwrap();
    }
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn loss_chart_degenerate_inputs() {
    // No data: the axes, no series.
    let chart = loss_chart(&ChartData::default()).unwrap();
    check_layout(&chart);
    for c in [TRAIN_COLOR, EVAL_COLOR, LR_COLOR] {
        assert_eq!(count_color(&chart.image, c), 0);
    }
    assert!(dark_in(&chart.image, 0, CHART_WIDTH as i32, 0, CHART_HEIGHT as i32) > 1000);

    // One point of each series: dots where they belong.
    let one = ChartData {
        train_loss: vec![(5.0, 2.0)],
        eval_loss: vec![(5.0, 2.5)],
        learning_rate: vec![(5.0, 1e-4)],
    };
    let chart = loss_chart(&one).unwrap();
    check_layout(&chart);
    assert!(colour_near(
        &chart.image,
        chart.loss.pixel(5.0, 2.0),
        1,
        TRAIN_COLOR
    ));
    assert!(colour_near(
        &chart.image,
        chart.loss.pixel(5.0, 2.5),
        1,
        EVAL_COLOR
    ));
    assert!(colour_near(
        &chart.image,
        chart.learning_rate.pixel(5.0, 1e-4),
        1,
        LR_COLOR
    ));
    // A point at step 0 and a flat loss still give ranges with room.
    let flat = ChartData {
        train_loss: vec![(0.0, 3.0), (0.0, 3.0)],
        eval_loss: vec![],
        learning_rate: vec![(0.0, 0.0)],
    };
    let chart = loss_chart(&flat).unwrap();
    check_layout(&chart);
    assert!(chart.loss.x.end > chart.loss.x.start);
    assert!(chart.loss.y.start < 3.0 && chart.loss.y.end > 3.0);
    assert!(chart.learning_rate.y.end > chart.learning_rate.y.start);
    assert!(colour_near(
        &chart.image,
        chart.loss.pixel(0.0, 3.0),
        2,
        TRAIN_COLOR
    ));

    // Non-finite points are left out; the rest is drawn.
    let nan = ChartData {
        train_loss: vec![
            (1.0, f64::NAN),
            (2.0, 3.0),
            (3.0, f64::INFINITY),
            (4.0, 2.0),
        ],
        eval_loss: vec![(f64::NAN, 1.0), (3.0, 2.5)],
        learning_rate: vec![(1.0, f64::NAN), (2.0, 1e-3), (4.0, 2e-3)],
    };
    let chart = loss_chart(&nan).unwrap();
    check_layout(&chart);
    assert_eq!(chart.loss.x, -0.08..4.08);
    assert!(chart.loss.y.end < 3.5, "{:?}", chart.loss.y);
    for (x, y) in [(2.0, 3.0), (2.5, 2.75), (4.0, 2.0)] {
        assert!(colour_near(
            &chart.image,
            chart.loss.pixel(x, y),
            2,
            TRAIN_COLOR
        ));
    }
    assert!(colour_near(
        &chart.image,
        chart.loss.pixel(3.0, 2.5),
        1,
        EVAL_COLOR
    ));
    assert!(colour_near(
        &chart.image,
        chart.learning_rate.pixel(3.0, 1.5e-3),
        2,
        LR_COLOR
    ));
    // Negative losses (not a CLIP loss, but a chart should not care).
    let neg = ChartData {
        train_loss: vec![(1.0, -1.0), (2.0, 1.0)],
        ..ChartData::default()
    };
    let chart = loss_chart(&neg).unwrap();
    check_layout(&chart);
    assert!(chart.loss.y.start < -1.0);
    let path = temp_dir("png-degenerate").join("c.png");
    for d in [ChartData::default(), one, flat, nan, neg] {
        loss_curve_png(&path, &d).unwrap();
        let img = image::open(&path).unwrap().to_rgb8();
        assert!(img == loss_chart(&d).unwrap().image);
    }
    std::fs::remove_dir_all(path.parent().unwrap()).ok();
}

//! The batch loader: deterministic order, identical batches for any worker
//! count, exact resume, bad pictures skipped and reported, drop_last.

use clip_wgpu::data::demo;
use clip_wgpu::data::image::{load_image, preprocess, ImageProcessorConfig};
use clip_wgpu::data::loader::{epoch_order, load_pixels, LoadedBatch, Loader};
use clip_wgpu::data::sources::{Example, ImageSource};
use std::path::PathBuf;
use std::sync::Arc;

mod common;
use common::loading::{loader_cfg as cfg, processor, tokenizer};

fn temp_dir(name: &str) -> PathBuf {
    let d = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("loader-{name}"));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Demo examples with some real files mixed in: good PNGs, a corrupt one, a
/// missing one.
fn mixed_examples(dir: &std::path::Path) -> Vec<Example> {
    let mut ex = demo::examples(40, 11);
    for (i, [w, h]) in [[40u32, 30], [20, 50], [33, 33]].into_iter().enumerate() {
        let p = dir.join(format!("good{i}.png"));
        image::RgbImage::from_fn(w, h, |x, y| {
            image::Rgb([(x * 7) as u8, (y * 5) as u8, (i * 90) as u8])
        })
        .save(&p)
        .unwrap();
        ex.insert(
            5 + 9 * i,
            Example {
                image: ImageSource::File(p),
                caption: format!("good picture {i}"),
                image_id: 1000 + i as u64,
            },
        );
    }
    let corrupt = dir.join("x.png");
    std::fs::write(&corrupt, b"\x89PNG\r\n\x1a\ngarbage garbage garbage").unwrap();
    ex.insert(
        3,
        Example {
            image: ImageSource::File(corrupt),
            caption: "corrupt".into(),
            image_id: 2000,
        },
    );
    ex.insert(
        20,
        Example {
            image: ImageSource::File(dir.join("missing.jpg")),
            caption: "missing".into(),
            image_id: 2001,
        },
    );
    ex
}

fn all_batches(loader: &mut Loader) -> Vec<LoadedBatch> {
    let mut out = Vec::new();
    while let Some(b) = loader.next_batch().unwrap() {
        out.push(b);
    }
    out
}

#[test]
fn epoch_order_is_a_pinned_permutation() {
    let a = epoch_order(1000, 42, 3);
    assert_eq!(a, epoch_order(1000, 42, 3));
    assert_ne!(a, epoch_order(1000, 42, 4));
    assert_ne!(a, epoch_order(1000, 43, 3));
    let mut s = a.clone();
    s.sort_unstable();
    assert_eq!(s, (0..1000).collect::<Vec<_>>());
    // Pinned: the same on every platform (checked against a Python
    // transcription of splitmix64 + Fisher-Yates).
    assert_eq!(epoch_order(10, 42, 0), PINNED_10_42_0);
    assert_eq!(epoch_order(0, 1, 1), Vec::<usize>::new());
    assert_eq!(epoch_order(1, 1, 1), [0]);
}

const PINNED_10_42_0: [usize; 10] = [0, 3, 5, 7, 9, 8, 2, 1, 4, 6];

#[test]
fn batches_match_preprocess_and_tokenizer() {
    let d = temp_dir("contents");
    let ex = Arc::new(mixed_examples(&d));
    let order: Vec<usize> = (0..ex.len()).collect();
    let mut loader =
        Loader::new(ex.clone(), order, 0, cfg(8, 3), processor(), tokenizer()).unwrap();
    let batches = all_batches(&mut loader);
    // 45 examples, 2 unreadable: 43 = 5 x 8 + 3.
    assert_eq!(
        batches.iter().map(|b| b.batch).collect::<Vec<_>>(),
        [8, 8, 8, 8, 8, 3]
    );
    assert_eq!(loader.position(), ex.len());
    assert!(loader.next_batch().unwrap().is_none());
    let px = 3 * 32 * 32;
    let mut seen = Vec::new();
    for b in &batches {
        assert_eq!(b.pixels.len(), b.batch * px);
        assert_eq!(b.ids.len(), b.batch * 16);
        assert_eq!(b.mask.len(), b.batch * 16);
        assert_eq!(b.positions.len(), b.batch);
        let caps: Vec<&str> = b
            .positions
            .iter()
            .map(|&i| ex[i].caption.as_str())
            .collect();
        let (ids, mask) = tokenizer().encode_batch(&caps, 16).unwrap();
        assert_eq!(b.ids, ids);
        assert_eq!(b.mask, mask);
        for (k, &i) in b.positions.iter().enumerate() {
            assert_eq!(b.image_ids[k], ex[i].image_id);
            let want = match &ex[i].image {
                ImageSource::File(p) => preprocess(&load_image(p).unwrap(), &processor()).unwrap(),
                ImageSource::Demo(s) => {
                    let img = image::DynamicImage::ImageRgb8(demo::render(*s, 32).0);
                    preprocess(&img, &processor()).unwrap()
                }
                ImageSource::TarMember { .. } => unreachable!("no shards here"),
            };
            assert_eq!(b.pixels[k * px..(k + 1) * px], want[..], "example {i}");
            assert_eq!(load_pixels(&ex[i].image, &processor()).unwrap(), want);
        }
        seen.extend_from_slice(&b.positions);
    }
    let expect: Vec<usize> = (0..ex.len()).filter(|&i| i != 3 && i != 20).collect();
    assert_eq!(seen, expect);

    // The bad pictures are reported by path, in the batch they were met in.
    assert_eq!(batches[0].skipped.len(), 1);
    assert_eq!(batches[0].skipped[0].0, d.join("x.png"));
    assert!(
        batches[0].skipped[0].1.contains("x.png"),
        "{:?}",
        batches[0].skipped
    );
    assert_eq!(batches[2].skipped.len(), 1, "{:?}", batches[2].skipped);
    assert_eq!(batches[2].skipped[0].0, d.join("missing.jpg"));
    assert_eq!(loader.skipped().len(), 2);
    eprintln!("skipped: {:?}", loader.skipped());
}

#[test]
fn worker_count_does_not_change_batches() {
    let d = temp_dir("workers");
    let ex = Arc::new(mixed_examples(&d));
    let order = epoch_order(ex.len(), 5, 1);
    let run = |workers: usize, prefetch: usize| {
        let mut c = cfg(7, workers);
        c.prefetch = prefetch;
        let mut l = Loader::new(ex.clone(), order.clone(), 0, c, processor(), tokenizer()).unwrap();
        all_batches(&mut l)
    };
    let one = run(1, 1);
    assert_eq!(one.iter().map(|b| b.batch).sum::<usize>(), ex.len() - 2);
    assert_eq!(run(4, 2), one);
    assert_eq!(run(8, 5), one);
    assert_eq!(run(0, 0), one);
}

#[test]
fn resume_from_position() {
    let d = temp_dir("resume");
    let ex = Arc::new(mixed_examples(&d));
    let order = epoch_order(ex.len(), 9, 0);
    let mut full = Loader::new(
        ex.clone(),
        order.clone(),
        0,
        cfg(6, 2),
        processor(),
        tokenizer(),
    )
    .unwrap();
    let mut before = Vec::new();
    let mut positions = vec![full.position()];
    while let Some(b) = full.next_batch().unwrap() {
        before.push(b);
        positions.push(full.position());
    }
    // Resume after each batch boundary; the following batches are identical.
    for (k, &pos) in positions.iter().enumerate() {
        let mut l = Loader::new(
            ex.clone(),
            order.clone(),
            pos,
            cfg(6, 3),
            processor(),
            tokenizer(),
        )
        .unwrap();
        assert_eq!(l.position(), pos);
        let rest = all_batches(&mut l);
        assert_eq!(rest[..], before[k..], "resuming at {pos} (after batch {k})");
    }
    assert!(Loader::new(
        ex.clone(),
        order.clone(),
        ex.len() + 1,
        cfg(6, 1),
        processor(),
        tokenizer()
    )
    .is_err());
}

#[test]
fn drop_last_and_partial_batches() {
    let ex = Arc::new(demo::examples(10, 3));
    let order: Vec<usize> = (0..10).collect();
    let sizes = |drop_last: bool| {
        let mut c = cfg(4, 2);
        c.drop_last = drop_last;
        let mut l = Loader::new(ex.clone(), order.clone(), 0, c, processor(), tokenizer()).unwrap();
        let s: Vec<usize> = all_batches(&mut l).iter().map(|b| b.batch).collect();
        (s, l.position())
    };
    assert_eq!(sizes(false), (vec![4, 4, 2], 10));
    assert_eq!(sizes(true), (vec![4, 4], 10));
    // An empty order gives no batches.
    let mut l = Loader::new(ex.clone(), vec![], 0, cfg(4, 2), processor(), tokenizer()).unwrap();
    assert!(l.next_batch().unwrap().is_none());
    // A bad index is refused up front.
    assert!(Loader::new(ex.clone(), vec![10], 0, cfg(4, 2), processor(), tokenizer()).is_err());
}

#[test]
fn dropping_a_busy_loader_stops_it() {
    let ex = Arc::new(demo::examples(5000, 1));
    let order: Vec<usize> = (0..ex.len()).collect();
    for _ in 0..3 {
        let mut l = Loader::new(
            ex.clone(),
            order.clone(),
            0,
            cfg(16, 4),
            processor(),
            tokenizer(),
        )
        .unwrap();
        assert_eq!(l.next_batch().unwrap().unwrap().batch, 16);
        drop(l); // joins its threads; a hang fails the test by timeout
    }
    // Dropped before any batch was taken.
    let l = Loader::new(ex.clone(), order, 0, cfg(16, 4), processor(), tokenizer()).unwrap();
    drop(l);
}

#[test]
fn all_bad_pictures_is_an_error() {
    let d = temp_dir("allbad");
    let ex: Vec<Example> = (0..40)
        .map(|i| Example {
            image: ImageSource::File(d.join(format!("nope{i}.png"))),
            caption: "x".into(),
            image_id: i,
        })
        .collect();
    let ex = Arc::new(ex);
    let order: Vec<usize> = (0..40).collect();
    let mut l = Loader::new(ex.clone(), order, 0, cfg(8, 2), processor(), tokenizer()).unwrap();
    let err = format!("{:#}", l.next_batch().unwrap_err());
    assert!(
        err.contains("none of the 32 pictures") && err.contains("nope0.png"),
        "{err}"
    );
    assert!(l.next_batch().is_err());
    // Few pictures, all bad: an error at the end too.
    let mut l = Loader::new(ex, vec![0, 1, 2], 0, cfg(8, 2), processor(), tokenizer()).unwrap();
    let err = format!("{:#}", l.next_batch().unwrap_err());
    assert!(err.contains("none of the 3 pictures"), "{err}");
}

#[test]
fn demo_pictures_go_through_the_processor() {
    // A 224 processor renders demo pictures at 224 (resize is the identity).
    let p = ImageProcessorConfig::default();
    let ex = demo::examples(1, 2);
    let px = load_pixels(&ex[0].image, &p).unwrap();
    assert_eq!(px.len(), 3 * 224 * 224);
    let ImageSource::Demo(s) = ex[0].image else {
        panic!()
    };
    let img = image::DynamicImage::ImageRgb8(demo::render(s, 224).0);
    assert_eq!(px, preprocess(&img, &p).unwrap());
}

#[test]
fn without_refill_each_batch_is_its_own_slice_of_the_order() {
    // Data-parallel ranks: a bad picture makes its batch smaller instead of
    // pulling in the next slice's example.
    let d = temp_dir("no-refill");
    let ex = Arc::new(mixed_examples(&d));
    let order: Vec<usize> = (0..ex.len()).collect();
    let mut c = cfg(8, 2);
    c.refill = false;
    let mut loader = Loader::new(ex.clone(), order, 0, c, processor(), tokenizer()).unwrap();
    let batches = all_batches(&mut loader);
    // 45 entries in slices of 8; example 3 is in slice 0, example 20 in slice 2.
    assert_eq!(
        batches.iter().map(|b| b.batch).collect::<Vec<_>>(),
        [7, 8, 7, 8, 8, 5]
    );
    for (k, b) in batches.iter().enumerate() {
        let slice: Vec<usize> = (k * 8..((k + 1) * 8).min(ex.len()))
            .filter(|&i| i != 3 && i != 20)
            .collect();
        assert_eq!(b.positions, slice, "batch {k}");
    }
    assert_eq!(loader.position(), ex.len());
    // A slice with no readable picture is an error, not an early end.
    let bad: Vec<Example> = (0..4)
        .map(|i| Example {
            image: ImageSource::File(d.join(format!("gone{i}.png"))),
            caption: "gone".into(),
            image_id: 3000 + i,
        })
        .collect();
    let mut ex2: Vec<Example> = demo::examples(4, 1);
    ex2.extend(bad);
    ex2.extend(demo::examples(4, 2));
    let mut c = cfg(4, 1);
    c.refill = false;
    let mut loader = Loader::new(
        Arc::new(ex2),
        (0..12).collect(),
        0,
        c,
        processor(),
        tokenizer(),
    )
    .unwrap();
    assert_eq!(loader.next_batch().unwrap().unwrap().batch, 4);
    let e = loader.next_batch().unwrap_err();
    assert!(
        format!("{e:#}").contains("every picture of a batch"),
        "{e:#}"
    );
}

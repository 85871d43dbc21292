//! The built-in captioned dataset `clip-wgpu train` uses when given no data:
//! one flat coloured shape on a plain background, captioned with its colour,
//! kind and place, e.g. "a red circle on the left", "an orange cross at the
//! top".
//!
//! It is made for a tiny CLIP (64 px, patch 8, width 128, 4 layers) trained
//! from scratch for a few minutes on a CPU: 6 well-separated colours x 4
//! shapes x 5 places = [`NUM_CAPTIONS`] (120) captions, large shapes (about
//! a third of the picture wide) with no outlines or texture, and a fixed
//! caption template, so every attribute is visible at 8 px patches and every
//! caption word carries one attribute. Each picture jitters the shape's size
//! and position, the colour's shade and the background's grey, so no two
//! pictures are alike and the model has to learn the attributes rather than
//! memorise pixels.
//!
//! A picture is fully determined by its seed: the caption is
//! `seed % NUM_CAPTIONS` and the jitter comes from the seed's hash. Rendering
//! uses only IEEE-exact arithmetic (+, -, *, /, comparisons; no sin/cos), so
//! the pixels are the same on every platform.
//!
//! [`examples`] draws training pictures at random; [`held_out`] draws an
//! evaluation set in which every caption occurs once, so recall@1 has a
//! clear meaning: with N held-out examples the chance level of recall@K is
//! K / N in both directions (1/120 = 0.8% for recall@1 on the full set).

use crate::data::sources::{mix64, shuffle, Example, ImageSource, SplitMix64};
use image::{Rgb, RgbImage};

/// Colour names and their base RGB (each picture jitters it by up to ±12).
pub const COLOURS: [(&str, [u8; 3]); 6] = [
    ("red", [215, 35, 35]),
    ("orange", [245, 135, 20]),
    ("yellow", [235, 215, 30]),
    ("green", [40, 165, 60]),
    ("blue", [40, 85, 215]),
    ("purple", [140, 55, 185]),
];

/// Shape names.
pub const SHAPES: [&str; 4] = ["circle", "square", "triangle", "cross"];

/// Place phrases and the shape's centre there, as fractions of the picture.
pub const PLACES: [(&str, f64, f64); 5] = [
    ("on the left", 0.25, 0.5),
    ("on the right", 0.75, 0.5),
    ("at the top", 0.5, 0.25),
    ("at the bottom", 0.5, 0.75),
    ("in the middle", 0.5, 0.5),
];

/// Number of distinct captions (colours x shapes x places).
pub const NUM_CAPTIONS: usize = COLOURS.len() * SHAPES.len() * PLACES.len();

/// The (colour, shape, place) indices of caption number `index`
/// (`index < NUM_CAPTIONS`).
pub fn attributes(index: usize) -> (usize, usize, usize) {
    let c = index % COLOURS.len();
    let s = (index / COLOURS.len()) % SHAPES.len();
    let p = index / (COLOURS.len() * SHAPES.len()) % PLACES.len();
    (c, s, p)
}

/// Caption number `index` (`index < NUM_CAPTIONS`), e.g. "a red circle on
/// the left".
pub fn caption(index: usize) -> String {
    let (c, s, p) = attributes(index);
    let colour = COLOURS[c].0;
    let article = if colour.starts_with(['a', 'e', 'i', 'o', 'u']) {
        "an"
    } else {
        "a"
    };
    format!("{article} {colour} {} {}", SHAPES[s], PLACES[p].0)
}

/// The caption of the picture with this seed, without rendering it.
pub fn caption_of(seed: u64) -> String {
    caption((seed % NUM_CAPTIONS as u64) as usize)
}

/// Render the picture with this seed as a `size` x `size` RGB image, and its
/// caption. Edges are anti-aliased with 4x4 supersampling.
pub fn render(seed: u64, size: u32) -> (RgbImage, String) {
    let index = (seed % NUM_CAPTIONS as u64) as usize;
    let (c, s, p) = attributes(index);
    let mut rng = SplitMix64(mix64(seed ^ 0xDE30_5EED));
    let mut jitter = |amp: f64| (rng.unit() * 2.0 - 1.0) * amp;

    let grey = 205.0 + jitter(25.0);
    let bg = [grey + jitter(8.0), grey + jitter(8.0), grey + jitter(8.0)];
    let base = COLOURS[c].1;
    let fg = [
        base[0] as f64 + jitter(12.0),
        base[1] as f64 + jitter(12.0),
        base[2] as f64 + jitter(12.0),
    ];
    let n = size as f64;
    // Half-size of the shape; centres jitter by up to 4% of the picture but
    // keep the shape inside it.
    let r = n * (0.19 + jitter(0.03));
    let (_, px, py) = PLACES[p];
    let reach = r * 1.15;
    let cx = (n * (px + jitter(0.04))).clamp(reach, (n - reach).max(reach));
    let cy = (n * (py + jitter(0.04))).clamp(reach, (n - reach).max(reach));

    let inside = |x: f64, y: f64| -> bool {
        let (dx, dy) = (x - cx, y - cy);
        match s {
            0 => dx * dx + dy * dy <= r * r,
            1 => dx.abs() <= 0.85 * r && dy.abs() <= 0.85 * r,
            // Apex up at -1.1 r, base at +0.85 r, half-width 1.15 r.
            2 => dy <= 0.85 * r && dy >= -1.1 * r && dx.abs() <= (dy + 1.1 * r) / 1.95 * 1.15,
            _ => {
                let (ax, ay) = (dx.abs(), dy.abs());
                (ax <= r && ay <= 0.35 * r) || (ay <= r && ax <= 0.35 * r)
            }
        }
    };

    const SS: usize = 4;
    let bgp = Rgb(bg.map(to_u8));
    let mut img = RgbImage::from_pixel(size, size, bgp);
    // Only pixels near the shape need sampling.
    let lo = |v: f64| ((v - reach - 1.0).floor().max(0.0)) as u32;
    let hi = |v: f64| ((v + reach + 1.0).ceil().min(n)) as u32;
    for y in lo(cy)..hi(cy) {
        for x in lo(cx)..hi(cx) {
            let mut hits = 0usize;
            for sy in 0..SS {
                for sx in 0..SS {
                    let fx = x as f64 + (sx as f64 + 0.5) / SS as f64;
                    let fy = y as f64 + (sy as f64 + 0.5) / SS as f64;
                    hits += inside(fx, fy) as usize;
                }
            }
            if hits > 0 {
                let a = hits as f64 / (SS * SS) as f64;
                let mix = |k: usize| to_u8(fg[k] * a + bg[k] * (1.0 - a));
                img.put_pixel(x, y, Rgb([mix(0), mix(1), mix(2)]));
            }
        }
    }
    (img, caption(index))
}

fn to_u8(v: f64) -> u8 {
    (v + 0.5).floor().clamp(0.0, 255.0) as u8
}

/// `n` training pictures drawn at random (captions uniform over the
/// [`NUM_CAPTIONS`], repeats expected); `image_id` is the index.
pub fn examples(n: usize, seed: u64) -> Vec<Example> {
    let mut rng = SplitMix64(mix64(seed ^ 0x7EA1_0000));
    (0..n)
        .map(|i| {
            let s = rng.next_u64();
            Example {
                image: ImageSource::Demo(s),
                caption: caption_of(s),
                image_id: i as u64,
            }
        })
        .collect()
}

/// An evaluation set of `min(n, NUM_CAPTIONS)` pictures whose captions are
/// all different (a random selection of them, in random order; different
/// pictures from [`examples`]'s, as those use another seed stream). Chance
/// level of recall@K on it is K / len. `image_id` is the index.
pub fn held_out(n: usize, seed: u64) -> Vec<Example> {
    let mut which: Vec<usize> = (0..NUM_CAPTIONS).collect();
    shuffle(&mut which, mix64(seed ^ 0x4E1D_0017));
    let mut rng = SplitMix64(mix64(seed ^ 0x4E1D_0000));
    which
        .into_iter()
        .take(n)
        .enumerate()
        .map(|(i, idx)| {
            // A random seed whose caption is `idx`: (2^56 - 1) * 120 + 119
            // fits in u64.
            let s = (rng.next_u64() >> 8) * NUM_CAPTIONS as u64 + idx as u64;
            Example {
                image: ImageSource::Demo(s),
                caption: caption(idx),
                image_id: i as u64,
            }
        })
        .collect()
}

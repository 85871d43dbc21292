//! 16-bit storage kernels (shaders/convert.wgsl) against the `half` crate's
//! round-to-nearest-even, bit for bit: normal values, halfway cases,
//! subnormals, overflow to infinity, NaN, odd lengths; and the saved copy
//! shared between ops.
mod common;
use clip_wgpu::ops::convert::{pack, round_copy, round_pack, save, Saved};
use clip_wgpu::precision::{f32_to_bf16_bits, f32_to_f16_bits, Precision};
use clip_wgpu::Tensor;
use common::*;

/// Values that exercise every branch of the conversions.
fn cases(r: &mut Rng) -> Vec<f32> {
    let mut v = vec![
        0.0,
        -0.0,
        1.0,
        -2.5,
        65504.0,
        65519.0,
        65520.0,
        -70000.0,
        1e-8,
        2f32.powi(-24),
        2f32.powi(-25),
        3.0 * 2f32.powi(-26),
        2f32.powi(-14),
        2f32.powi(-14) * (1.0 - 2f32.powi(-11)),
        6.1e-5,
        1.0 + 2f32.powi(-11),
        1.0 + 3.0 * 2f32.powi(-11),
        1.0 + 2f32.powi(-8),
        1.0 + 3.0 * 2f32.powi(-8),
        f32::MAX,
        f32::MIN_POSITIVE,
        1e-40,
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::NAN,
        -f32::NAN,
        f32::from_bits(0x7fa0_0001),
        3.4e38,
    ];
    // Random magnitudes across f16's whole range and beyond, and random
    // bit patterns (every exponent, ties included by chance).
    for _ in 0..3000 {
        let e = (r.uniform() * 60.0 - 35.0) as i32;
        let s = if r.below(2) == 0 { 1.0 } else { -1.0 };
        v.push(s * (1.0 + r.uniform() as f32) * 2f32.powi(e));
    }
    for _ in 0..3000 {
        v.push(f32::from_bits(r.next_u64() as u32));
    }
    v
}

/// The `half` crate's bits of each value.
fn half_bits(x: &[f32], fmt: Precision) -> Vec<u16> {
    x.iter()
        .map(|&v| match fmt {
            Precision::F16 => f32_to_f16_bits(v),
            _ => f32_to_bf16_bits(v),
        })
        .collect()
}

fn same_bits(a: f32, b: f32) -> bool {
    a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan())
}

#[test]
fn packing_matches_the_half_crate() {
    let Some(gpu) = gpu() else { return };
    let mut r = Rng::new(5);
    let all = cases(&mut r);
    for n in [all.len(), all.len() - 1, 1, 2, 3] {
        let x = &all[..n];
        let t = Tensor::from_slice(&gpu, x, &[n]).unwrap();
        for fmt in [Precision::F16, Precision::Bf16] {
            let want = half_bits(x, fmt);
            let h = pack(&t, fmt).unwrap();
            let got = h.to_bits().unwrap();
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                assert_eq!(
                    g,
                    w,
                    "{} bits of {:e} ({:#010x}), n {n}",
                    fmt.name(),
                    x[i],
                    x[i].to_bits()
                );
            }
            // Back to f32: exactly the format's value.
            let back = h.unpack().unwrap().to_vec().unwrap();
            let rounded = round_copy(&t, fmt).unwrap().to_vec().unwrap();
            for i in 0..n {
                let want = fmt.round(x[i]);
                assert!(
                    same_bits(back[i], want),
                    "{} unpack of {:e}",
                    fmt.name(),
                    x[i]
                );
                assert!(
                    same_bits(rounded[i], want),
                    "{} round of {:e}",
                    fmt.name(),
                    x[i]
                );
            }
            // Round in place and pack in one pass: the same.
            let t2 = Tensor::from_slice(&gpu, x, &[n]).unwrap();
            let h2 = round_pack(&t2, fmt).unwrap();
            assert_eq!(
                h2.to_bits().unwrap(),
                want,
                "{} round_pack bits",
                fmt.name()
            );
            let v2 = t2.to_vec().unwrap();
            assert!((0..n).all(|i| same_bits(v2[i], fmt.round(x[i]))));
        }
    }
}

#[test]
fn saved_copies_are_shared_and_exact() {
    let Some(gpu) = gpu() else { return };
    let mut r = Rng::new(6);
    let x: Vec<f32> = (0..1001)
        .map(|_| (r.uniform() as f32 - 0.5) * 10.0)
        .collect();
    let t = Tensor::from_slice(&gpu, &x, &[7, 143]).unwrap();
    for fmt in [Precision::F16, Precision::Bf16] {
        let t = Tensor::from_slice(&gpu, &x, &[7, 143]).unwrap();
        let s1 = save(&t, fmt).unwrap();
        let want = clip_wgpu::ops::convert::round_ref(&x, fmt);
        assert_eq!(s1.get().unwrap().to_vec().unwrap(), want);
        // A second op saving the same buffer (here through a reshape) gets
        // the same words, not a second copy.
        let s2 = save(&t.reshape(&[1001]).unwrap(), fmt).unwrap();
        let (Saved::Half(a), Saved::Half(b)) = (&s1, &s2) else {
            panic!("a half mode saves 16-bit copies")
        };
        assert!(a.words().same_storage(b.words()));
        assert_eq!(s2.get().unwrap().to_vec().unwrap(), want);
        assert_eq!(b.shape(), &[1001]);
        // The input is untouched.
        assert_eq!(t.to_vec().unwrap(), x);
    }
    // At f32 nothing is copied.
    let Saved::Full(f) = save(&t, Precision::F32).unwrap() else {
        panic!("f32 keeps the tensor")
    };
    assert!(f.same_storage(&t));
}

/// Tensors larger than one binding are converted in windows (the adapter's
/// limit lowered to 4 KiB here): the same bits, odd lengths included.
#[test]
fn windows_convert_large_tensors() {
    let Some(gpu) = own_gpu() else { return };
    gpu.set_binding_limit(4096);
    let mut r = Rng::new(7);
    for n in [5001, 4096, 1025] {
        let x: Vec<f32> = (0..n).map(|_| (r.uniform() as f32 - 0.5) * 300.0).collect();
        for fmt in [Precision::F16, Precision::Bf16] {
            let want = half_bits(&x, fmt);
            let t = Tensor::from_slice(&gpu, &x, &[n]).unwrap();
            let h = pack(&t, fmt).unwrap();
            assert_eq!(h.to_bits().unwrap(), want, "{} pack, n {n}", fmt.name());
            let back = h.unpack().unwrap().to_vec().unwrap();
            assert!(
                back.iter().zip(&x).all(|(b, v)| *b == fmt.round(*v)),
                "{} unpack, n {n}",
                fmt.name()
            );
            let h2 = round_pack(&t, fmt).unwrap();
            assert_eq!(
                h2.to_bits().unwrap(),
                want,
                "{} round_pack, n {n}",
                fmt.name()
            );
            assert_eq!(
                t.to_vec().unwrap(),
                back,
                "{} rounded in place, n {n}",
                fmt.name()
            );
        }
    }
}

mod common;
use clip_wgpu::ops::matmul::{
    block_fits, gemm, gemm_backward, gemm_backward_ref, gemm_ref, tile_name, Block, Gemm, Kernel,
    Tile, Variant, BLOCKS, SG_TILES, VEC4_TILES,
};
use common::*;

#[allow(clippy::too_many_arguments)]
fn check(
    batch: usize,
    m: usize,
    n: usize,
    k: usize,
    ta: bool,
    tb: bool,
    bias: bool,
    seed: u64,
    v: Variant,
    tile: Option<Tile>,
    block: Option<Block>,
) {
    let Some(gpu) = gpu() else { return };
    let mut r = Rng::new(seed);
    let mut g = Gemm::new(batch, m, n, k)
        .ta(ta)
        .tb(tb)
        .alpha(0.7)
        .variant(v);
    g.tile = tile;
    g.block = block;
    let a = r.vec(batch * m * k, 1.0);
    let b = r.vec(batch * k * n, 1.0);
    let bi = r.vec(n, 1.0);
    let (ash, bsh) = (
        if ta { [batch, k, m] } else { [batch, m, k] },
        if tb { [batch, n, k] } else { [batch, k, n] },
    );
    let (at, bt, biast) = (
        upload(&gpu, &a, &ash),
        upload(&gpu, &b, &bsh),
        upload(&gpu, &bi, &[n]),
    );
    let c = gemm(&at, &bt, bias.then_some(&biast), g).unwrap();
    let want = gemm_ref(&a, &b, bias.then_some(&bi[..]), g);
    let name = format!(
        "matmul {v:?} {}{} b{batch} {m}x{n}x{k} ta={ta} tb={tb}",
        tile.map_or(String::new(), tile_name),
        block.map_or(String::new(), |b| b.to_string()),
    );
    assert_close(
        &format!("{name} forward"),
        &download(&c),
        &want,
        1e-5 * (k as f64).sqrt(),
    );
    let dc = r.vec(batch * m * n, 1.0);
    let dct = upload(&gpu, &dc, &[batch, m, n]);
    let (da, db) = gemm_backward(&dct, &at, &bt, g, true, true).unwrap();
    let (da_ref, db_ref) = gemm_backward_ref(&dc, &a, &b, g);
    let tol = 1e-5 * ((m.max(n) * batch) as f64).sqrt();
    assert_close(&format!("{name} dA"), &download(&da.unwrap()), &da_ref, tol);
    assert_close(&format!("{name} dB"), &download(&db.unwrap()), &db_ref, tol);
}

#[test]
fn matmul_odd_sizes_all_transposes() {
    let mut seed = 1;
    for &(batch, m, n, k) in &[
        (1, 1, 1, 1),
        (1, 7, 50, 77),
        (3, 77, 7, 50),
        (2, 257, 65, 33),
        (1, 50, 257, 7),
        (2, 67, 132, 19),
        (1, 130, 72, 5),
        (2, 37, 24, 12),
        (1, 36, 44, 9),
        (1, 68, 136, 20),
    ] {
        for ta in [false, true] {
            for tb in [false, true] {
                for v in [
                    Variant::Regs,
                    Variant::Vec4,
                    Variant::Tiled,
                    Variant::Blocked,
                ] {
                    check(batch, m, n, k, ta, tb, seed % 2 == 0, seed, v, None, None);
                }
                seed += 1;
            }
        }
    }
}

#[test]
fn matmul_shared_weight_gradient_sums_batch() {
    let Some(gpu) = gpu() else { return };
    let mut r = Rng::new(9);
    let (batch, m, n, k) = (3, 5, 7, 9);
    let g = Gemm::new(batch, m, n, k).tb(true);
    let a = r.vec(batch * m * k, 1.0);
    let w = r.vec(n * k, 1.0);
    let (at, wt) = (upload(&gpu, &a, &[batch, m, k]), upload(&gpu, &w, &[n, k]));
    let c = gemm(&at, &wt, None, g).unwrap();
    assert_close(
        "shared fwd",
        &download(&c),
        &gemm_ref(&a, &w, None, g),
        1e-5,
    );
    let dc = r.vec(batch * m * n, 1.0);
    let (_, dw) =
        gemm_backward(&upload(&gpu, &dc, &[batch, m, n]), &at, &wt, g, false, true).unwrap();
    let (_, dw_ref) = gemm_backward_ref(&dc, &a, &w, g);
    assert_close("shared dW", &download(&dw.unwrap()), &dw_ref, 1e-5);
}

#[test]
fn matmul_reference_backward_matches_finite_differences() {
    let mut r = Rng::new(5);
    for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
        let g = Gemm::new(2, 3, 4, 5).ta(ta).tb(tb).alpha(1.3);
        let a = r.vec(2 * 3 * 5, 1.0);
        let b = r.vec(2 * 5 * 4, 1.0);
        let w = r.vec(2 * 3 * 4, 1.0);
        let (da, db) = gemm_backward_ref(&w, &a, &b, g);
        let na = numeric_grad(&a, |x| dot(&gemm_ref(x, &b, None, g), &w));
        let nb = numeric_grad(&b, |x| dot(&gemm_ref(&a, x, None, g), &w));
        assert!(max_err(&da, &na) < 1e-7, "dA vs fd");
        assert!(max_err(&db, &nb) < 1e-7, "dB vs fd");
    }
}

/// Every register tile of the vec4 kernel, and of its subgroup version where
/// the adapter has subgroups of 8, at 4-aligned shapes that are not
/// multiples of the tiles, all transposes, batched, forward and backward.
#[test]
fn matmul_every_vec4_tile() {
    let Some(gpu) = gpu() else { return };
    let sg: &[Tile] = if gpu.subgroups_of_8() { &SG_TILES } else { &[] };
    let mut seed = 500;
    for &t in VEC4_TILES.iter().chain(sg) {
        for &(batch, m, n, k) in &[(1, 36, 44, 12), (2, 132, 68, 20), (1, 260, 140, 64)] {
            for (ta, tb) in [(false, false), (true, false), (false, true)] {
                seed += 1;
                check(
                    batch,
                    m,
                    n,
                    k,
                    ta,
                    tb,
                    seed % 2 == 0,
                    seed,
                    Variant::Vec4,
                    Some(t),
                    None,
                );
            }
        }
    }
}

/// The bias-gradient epilogue (sums over k of a transposed A, made from the
/// product's own loads) with every vec4 tile, the scalar kernel's fallback,
/// and k with and without a remainder after the subgroup tiles' unrolling.
#[test]
fn matmul_bias_grad_epilogue() {
    use clip_wgpu::ops::matmul::{gemm_act_into, Epilogue};
    use clip_wgpu::tensor::Tensor;
    let Some(gpu) = gpu() else { return };
    let sg: &[Tile] = if gpu.subgroups_of_8() { &SG_TILES } else { &[] };
    let mut r = Rng::new(900);
    let tiles = VEC4_TILES.iter().chain(sg).map(|t| Some(*t)).chain([None]);
    for t in tiles {
        for &(m, n, k) in &[(36, 44, 13), (132, 68, 22), (260, 140, 7), (8, 4, 1)] {
            let a = r.vec(k * m, 1.0);
            let b = r.vec(k * n, 1.0);
            let mut g = Gemm::new(1, m, n, k).ta(true);
            g.variant = Some(if t.is_some() {
                Variant::Vec4
            } else {
                Variant::Regs
            });
            g.tile = t;
            let (at, bt) = (upload(&gpu, &a, &[k, m]), upload(&gpu, &b, &[k, n]));
            let c = Tensor::empty(&gpu, &[m, n]).unwrap();
            let sums = Tensor::empty(&gpu, &[m]).unwrap();
            gemm_act_into(&c, &at, &bt, None, g, Some(Epilogue::BiasGrad(&sums))).unwrap();
            let name = format!(
                "bias grad {} {m}x{n}x{k}",
                t.map_or("regs".into(), tile_name)
            );
            let want: Vec<f64> = (0..m)
                .map(|i| (0..k).map(|kk| a[kk * m + i]).sum())
                .collect();
            assert_close(&format!("{name} sums"), &download(&sums), &want, 1e-5);
            let prod = gemm_ref(&a, &b, None, g);
            assert_close(&format!("{name} product"), &download(&c), &prod, 1e-5);
        }
    }
}

/// Every block of the GPU matmul (matmul_blocked) this adapter can run, at
/// 4-aligned shapes smaller than, equal to and not multiples of the blocks,
/// with k shorter than, equal to and not a multiple of BK (the double
/// buffer's first, middle and last steps), all transposes, batched, forward
/// and backward (the backward matmuls run the same block).
#[test]
fn matmul_every_gpu_block() {
    let Some(gpu) = gpu() else { return };
    let blocks: Vec<Block> = BLOCKS
        .iter()
        .copied()
        .filter(|b| block_fits(b, &gpu))
        .collect();
    // Lavapipe runs all but those over its workgroup memory; a GPU all.
    assert!(blocks.len() >= 7, "only {blocks:?} fit");
    let mut seed = 700;
    for &bl in &blocks {
        for &(batch, m, n, k) in &[
            (1, 4, 4, 4),
            (2, 36, 44, 12),
            (1, bl.bm, bl.bn, bl.bk),
            (2, 132, 68, 36),
            (1, 260, 140, 64),
        ] {
            for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
                seed += 1;
                check(
                    batch,
                    m,
                    n,
                    k,
                    ta,
                    tb,
                    seed % 2 == 0,
                    seed,
                    Variant::Blocked,
                    None,
                    Some(bl),
                );
            }
        }
    }
}

/// The blocked kernel's epilogues against the CPU: accumulation, bias with
/// an activation written alongside (ACT 1), the activation's derivative
/// applied to C (ACT 2) and the bias gradient, with every block.
#[test]
fn matmul_blocked_epilogues() {
    use clip_wgpu::ops::activation::{act_backward_ref, act_ref, Act};
    use clip_wgpu::ops::matmul::{gemm_act_into, gemm_into, kernel_name, Epilogue};
    use clip_wgpu::tensor::Tensor;
    let Some(gpu) = gpu() else { return };
    let mut r = Rng::new(1200);
    for b in BLOCKS.iter().filter(|b| block_fits(b, &gpu)) {
        let (m, n, k) = (68, 76, 20);
        let g = Gemm::new(1, m, n, k).alpha(0.9).kernel(Kernel::Blocked(*b));
        let a = r.vec(m * k, 1.0);
        let w = r.vec(k * n, 1.0);
        let bias = r.vec(n, 1.0);
        let (at, wt, biast) = (
            upload(&gpu, &a, &[m, k]),
            upload(&gpu, &w, &[k, n]),
            upload(&gpu, &bias, &[n]),
        );
        let c = Tensor::empty(&gpu, &[m, n]).unwrap();
        assert_eq!(
            kernel_name(&g, &at, &wt, &c).unwrap(),
            format!("blocked {b}")
        );
        let prod = gemm_ref(&a, &w, Some(&bias), g);

        let out = Tensor::empty(&gpu, &[m, n]).unwrap();
        let kind = Act::QuickGelu;
        gemm_act_into(
            &c,
            &at,
            &wt,
            Some(&biast),
            g,
            Some(Epilogue::Act(kind, &out)),
        )
        .unwrap();
        assert_close(&format!("{b} act: C"), &download(&c), &prod, 1e-5);
        assert_close(
            &format!("{b} act: act(C)"),
            &download(&out),
            &act_ref(&prod, kind),
            1e-5,
        );
        // ACT 3: act(C) in place of C, the same values.
        let inplace = Tensor::empty(&gpu, &[m, n]).unwrap();
        let e = Some(Epilogue::ActInPlace(kind));
        gemm_act_into(&inplace, &at, &wt, Some(&biast), g, e).unwrap();
        assert!(download(&inplace) == download(&out), "{b} act in place");

        let x = r.vec(m * n, 1.0);
        let xt = upload(&gpu, &x, &[m, n]);
        gemm_act_into(
            &c,
            &at,
            &wt,
            None,
            g,
            Some(Epilogue::ActGrad(Act::Gelu, &xt)),
        )
        .unwrap();
        let plain = gemm_ref(&a, &w, None, g);
        assert_close(
            &format!("{b} act grad"),
            &download(&c),
            &act_backward_ref(&x, &plain, Act::Gelu),
            1e-5,
        );

        let old = r.vec(m * n, 1.0);
        let acc = upload(&gpu, &old, &[m, n]);
        let mut ga = g;
        ga.accumulate = true;
        gemm_into(&acc, &at, &wt, None, ga).unwrap();
        let want: Vec<f64> = plain.iter().zip(&old).map(|(p, o)| p + o).collect();
        assert_close(&format!("{b} accumulate"), &download(&acc), &want, 1e-5);

        // Bias gradient: A stored [k, m], sums over k of op(A).
        let gt = Gemm::new(1, m, n, k).ta(true).kernel(Kernel::Blocked(*b));
        let at_t = upload(&gpu, &a, &[k, m]);
        let sums = Tensor::empty(&gpu, &[m]).unwrap();
        gemm_act_into(&c, &at_t, &wt, None, gt, Some(Epilogue::BiasGrad(&sums))).unwrap();
        let want: Vec<f64> = (0..m)
            .map(|i| (0..k).map(|kk| a[kk * m + i]).sum())
            .collect();
        assert_close(
            &format!("{b} bias grad sums"),
            &download(&sums),
            &want,
            1e-5,
        );
        assert_close(
            &format!("{b} bias grad product"),
            &download(&c),
            &gemm_ref(&a, &w, None, gt),
            1e-5,
        );
    }
}

/// The cooperative-matrix kernel, forced: where the adapter has cooperative
/// matrices, against the CPU within what rounding the operands to f16
/// implies (relative 2^-11 each, so about 1e-3 of sqrt(k) * |a| |b|), every
/// transpose form and the epilogues it runs; elsewhere (lavapipe, GL) the
/// adapter's default kernel runs instead, exactly.
#[test]
fn matmul_coop_runs_or_falls_back() {
    use clip_wgpu::ops::matmul::kernel_name;
    use clip_wgpu::tensor::Tensor;
    let Some(gpu) = gpu() else { return };
    let mut r = Rng::new(1500);
    for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
        let (batch, m, n, k) = (2, 36, 44, 40);
        let g = Gemm::new(batch, m, n, k)
            .ta(ta)
            .tb(tb)
            .variant(Variant::Coop);
        let a = r.vec(batch * m * k, 1.0);
        let b = r.vec(batch * k * n, 1.0);
        let bias = r.vec(n, 1.0);
        let at = upload(&gpu, &a, &if ta { [batch, k, m] } else { [batch, m, k] });
        let bt = upload(&gpu, &b, &if tb { [batch, n, k] } else { [batch, k, n] });
        let c = gemm(&at, &bt, Some(&upload(&gpu, &bias, &[n])), g).unwrap();
        let name =
            kernel_name(&g, &at, &bt, &Tensor::empty(&gpu, &[batch, m, n]).unwrap()).unwrap();
        let want = gemm_ref(&a, &b, Some(&bias), g);
        let tol = match gpu.coop {
            Some(s) => {
                assert_eq!(name, format!("coop {s}x{s}"));
                2e-3 * (k as f64).sqrt()
            }
            None => {
                assert!(
                    !name.starts_with("coop"),
                    "{name} without cooperative matrices"
                );
                1e-5 * (k as f64).sqrt()
            }
        };
        assert_close(
            &format!("{name} ta={ta} tb={tb}"),
            &download(&c),
            &want,
            tol,
        );
    }
}

/// Packed 16-bit operands (the half-precision modes' activations and
/// weight copies): every kernel, read through its f16/bf16 variant (vec4,
/// subgroup, blocked) or an f32 copy (the others), gives bitwise the
/// result of the same kernel on f32 tensors holding the unpacked values
/// (the shader decodes exactly what convert.wgsl's unpack gives), for B
/// alone packed (the backward: dY times a kept activation or weight) and
/// both packed (the forward), each transpose, a weight shared across the
/// batch, and the bias-gradient epilogue; and matches the CPU on the rounded
/// values.
#[test]
fn matmul_packed_operands_match_f32() {
    use clip_wgpu::ops::activation::{act_ref, Act};
    use clip_wgpu::ops::convert::pack;
    use clip_wgpu::ops::matmul::{gemm_act_into, Epilogue, Operand};
    use clip_wgpu::precision::Precision;
    use clip_wgpu::tensor::Tensor;
    let Some(gpu) = gpu() else { return };
    let sg: &[Tile] = if gpu.subgroups_of_8() { &SG_TILES } else { &[] };
    let mut kernels = vec![Kernel::Regs, Kernel::Tiled];
    kernels.extend(VEC4_TILES.iter().chain(sg).map(|t| Kernel::Vec4(*t)));
    kernels.extend(
        BLOCKS
            .iter()
            .filter(|b| block_fits(b, &gpu))
            .map(|b| Kernel::Blocked(*b)),
    );
    let mut r = Rng::new(1700);
    for (i, &kernel) in kernels.iter().enumerate() {
        // bf16's decode is one shift: every third kernel is enough.
        let fmts: &[Precision] = if i % 3 == 0 {
            &[Precision::F16, Precision::Bf16]
        } else {
            &[Precision::F16]
        };
        for (j, &fmt) in fmts.iter().enumerate() {
            // One transpose a kernel and format, in turn (each is a pipeline
            // to build, and lavapipe builds them slowly).
            let cases = [
                (false, true, true),
                (false, false, false),
                (true, false, false),
            ];
            {
                let (ta, tb, b_shared) = cases[(i + j) % 3];
                let (batch, m, n, k) = (2, 36, 44, 20);
                // Values past f16's range edges: subnormals, large ones.
                let scale = if fmt == Precision::F16 { 1e-5 } else { 1.0 };
                let mut a = r.vec(batch * m * k, 1.0);
                a.iter_mut().step_by(7).for_each(|v| *v *= scale);
                let b = r.vec(if b_shared { k * n } else { batch * k * n }, 300.0);
                let ash = if ta { [batch, k, m] } else { [batch, m, k] };
                let bsh = if tb { vec![n, k] } else { vec![batch, k, n] };
                let (at, bt) = (upload(&gpu, &a, &ash), upload(&gpu, &b, &bsh));
                let (ah, bh) = (pack(&at, fmt).unwrap(), pack(&bt, fmt).unwrap());
                let (au, bu) = (ah.unpack().unwrap(), bh.unpack().unwrap());
                let g = Gemm::new(batch, m, n, k).ta(ta).tb(tb).kernel(kernel);
                let want = download(&gemm(&au, &bu, None, g).unwrap());
                let name = format!("{} {} ta={ta} tb={tb}", kernel.name(), fmt.name());
                for (what, aop) in [("b16", Operand::F32(&au)), ("ab16", Operand::Half(&ah))] {
                    let got = download(&gemm(aop, &bh, None, g).unwrap());
                    assert!(
                        got.iter()
                            .zip(&want)
                            .all(|(x, y)| x.to_bits() == y.to_bits()),
                        "{name} {what}: not the f32 kernel's result"
                    );
                }
                // The ROUND epilogue (a half-precision linear's output, with
                // the activation alongside): C and act(C) rounded as the CPU
                // rounds the f32 kernel's C.
                let (c, h) = (
                    Tensor::empty(&gpu, &[batch, m, n]).unwrap(),
                    Tensor::empty(&gpu, &[batch, m, n]).unwrap(),
                );
                let gelu = Some(Epilogue::Act(Act::QuickGelu, &h));
                gemm_act_into(&c, &ah, &bh, None, g.round(fmt), gelu).unwrap();
                let rounded: Vec<f32> = want.iter().map(|v| fmt.round(*v as f32)).collect();
                assert_eq!(c.to_vec().unwrap(), rounded, "{name} rounded");
                // ACT 3 (no backward): the rounded activation in place of C.
                let inplace = Tensor::empty(&gpu, &[batch, m, n]).unwrap();
                let e = Some(Epilogue::ActInPlace(Act::QuickGelu));
                gemm_act_into(&inplace, &ah, &bh, None, g.round(fmt), e).unwrap();
                assert_eq!(
                    inplace.to_vec().unwrap(),
                    h.to_vec().unwrap(),
                    "{name} act in place"
                );
                let pre: Vec<f64> = rounded.iter().map(|v| *v as f64).collect();
                let acts: Vec<f32> = act_ref(&pre, Act::QuickGelu)
                    .iter()
                    .map(|v| fmt.round(*v as f32))
                    .collect();
                let got_h = h.to_vec().unwrap();
                let off = got_h.iter().zip(&acts).filter(|(x, y)| x != y).count();
                // act_ref is f64; the kernel's f32 activation may land on
                // the other side of a rounding boundary once in a while.
                assert!(
                    off * 100 <= acts.len(),
                    "{name}: {off} activations not rounded"
                );
                let round = |x: &[f64]| -> Vec<f64> {
                    x.iter().map(|v| fmt.round(*v as f32) as f64).collect()
                };
                let cpu = gemm_ref(&round(&a), &round(&b), None, g);
                assert_close(&format!("{name} vs CPU"), &want, &cpu, 1e-4 * 300.0);
            }
        }
        // The bias-gradient epilogue sums A's own (unpacked) loads.
        if matches!(kernel, Kernel::Vec4(_) | Kernel::Blocked(_)) && i % 4 == 0 {
            let (m, n, k) = (36, 44, 20);
            let a = r.vec(k * m, 1.0);
            let b = r.vec(k * n, 1.0);
            let g = Gemm::new(1, m, n, k).ta(true).kernel(kernel);
            let (at, bt) = (upload(&gpu, &a, &[k, m]), upload(&gpu, &b, &[k, n]));
            let (ah, bh) = (
                pack(&at, Precision::F16).unwrap(),
                pack(&bt, Precision::F16).unwrap(),
            );
            let run = |a: Operand, b: Operand| {
                let (c, s) = (
                    Tensor::empty(&gpu, &[m, n]).unwrap(),
                    Tensor::empty(&gpu, &[m]).unwrap(),
                );
                gemm_act_into(&c, a, b, None, g, Some(Epilogue::BiasGrad(&s))).unwrap();
                (c.to_vec().unwrap(), s.to_vec().unwrap())
            };
            let au = ah.unpack().unwrap();
            let want = run(Operand::F32(&au), Operand::F32(&bh.unpack().unwrap()));
            assert_eq!(
                run(Operand::Half(&ah), Operand::Half(&bh)),
                want,
                "{} bias grad",
                kernel.name()
            );
        }
    }
}

//! Tensors larger than the adapter can bind in one binding (lavapipe: 128
//! MiB; roberta-base's word embedding is 154 MB) are worked on in windows.
//! With the binding limit lowered to a few KiB, the windowed embedding
//! gather and scatter, AdamW step, gradient norm and accumulation give the same bits as
//! whole bindings, and the gather/scatter match a CPU reference.
mod common;
use clip_wgpu::ops::adamw::{adamw_step, grad_norm, AdamW};
use clip_wgpu::ops::elementwise::add_assign;
use clip_wgpu::ops::embedding::{gather_rows, group_ids, scatter_rows};
use clip_wgpu::Tensor;
use common::*;

const LIMIT: u64 = 8 << 10;

fn bits(t: &Tensor) -> Vec<u32> {
    t.to_vec().unwrap().iter().map(|v| v.to_bits()).collect()
}

#[test]
fn embedding_rows_in_windows() {
    let Some(gpu) = own_gpu() else { return };
    let mut rng = Rng::new(7);
    // d = 30: a row is not a whole number of 16-byte units; d = 64: it is.
    for d in [30usize, 64] {
        let rows = 700;
        let table_host = to_f32(&rng.vec(rows * d, 1.0));
        let table = Tensor::from_slice(&gpu, &table_host, &[rows, d]).unwrap();
        // Ids from every window, some repeated.
        let ids: Vec<u32> = (0..257).map(|_| rng.below(rows) as u32).collect();
        let idt = Tensor::from_u32(&gpu, &ids, &[ids.len()]).unwrap();
        let dy_host = to_f32(&rng.vec(ids.len() * d, 1.0));
        let dy = Tensor::from_slice(&gpu, &dy_host, &[ids.len(), d]).unwrap();
        let groups = group_ids(&gpu, &ids).unwrap();

        gpu.set_binding_limit(u64::MAX);
        let whole_g = bits(&gather_rows(&table, &idt, d).unwrap());
        let whole_s = bits(&scatter_rows(&dy, &groups, rows, d).unwrap());
        gpu.set_binding_limit(LIMIT);
        assert!(
            gpu.window_bytes(4 * d as u64) < (rows * d * 4) as u64,
            "the table must need several windows"
        );
        let win_g = gather_rows(&table, &idt, d).unwrap();
        let win_s = scatter_rows(&dy, &groups, rows, d).unwrap();
        gpu.set_binding_limit(u64::MAX);
        assert_eq!(bits(&win_g), whole_g, "gather d={d}: windows differ");
        assert_eq!(bits(&win_s), whole_s, "scatter d={d}: windows differ");

        // CPU reference: the gather copies rows; the scatter sums dy rows
        // per id in position order.
        let want_g: Vec<f32> = ids
            .iter()
            .flat_map(|&id| table_host[id as usize * d..(id as usize + 1) * d].to_vec())
            .collect();
        assert_eq!(win_g.to_vec().unwrap(), want_g, "gather d={d}");
        let mut want_s = vec![0.0f32; rows * d];
        for (q, &id) in ids.iter().enumerate() {
            for c in 0..d {
                want_s[id as usize * d + c] += dy_host[q * d + c];
            }
        }
        assert_eq!(win_s.to_vec().unwrap(), want_s, "scatter d={d}");
    }
}

#[test]
fn adamw_and_grad_norm_in_windows() {
    let Some(gpu) = own_gpu() else { return };
    let mut rng = Rng::new(11);
    // 4-aligned (vec4 kernel) and not.
    for n in [40_000usize, 40_001] {
        let host = |rng: &mut Rng, s| to_f32(&rng.vec(n, s));
        let (p0, g0, m0) = (
            host(&mut rng, 1.0),
            host(&mut rng, 0.1),
            host(&mut rng, 0.01),
        );
        let v0: Vec<f32> = host(&mut rng, 0.01).iter().map(|x| x * x).collect();
        let run = |limit: u64| {
            gpu.set_binding_limit(limit);
            let t = |x: &[f32]| Tensor::from_slice(&gpu, x, &[n]).unwrap();
            let (p, g, m, v) = (t(&p0), t(&g0), t(&m0), t(&v0));
            let norm = grad_norm(&[&g, &p], 0.5).unwrap();
            let hp = AdamW {
                lr: 1e-3,
                weight_decay: 0.1,
                ..AdamW::default()
            };
            adamw_step(&p, &g, &m, &v, 3, &hp, true, Some(&norm)).unwrap();
            // Gradient accumulation's acc += g.
            add_assign(&g, &m).unwrap();
            let out = [bits(&norm), bits(&p), bits(&m), bits(&v), bits(&g)];
            gpu.set_binding_limit(u64::MAX);
            out
        };
        let whole = run(u64::MAX);
        gpu.set_binding_limit(LIMIT);
        let several = gpu.window_bytes(16) < (n * 4) as u64;
        gpu.set_binding_limit(u64::MAX);
        assert!(several, "n = {n} must need several windows");
        let windowed = run(LIMIT);
        for (what, (a, b)) in ["norm", "param", "exp_avg", "exp_avg_sq", "accumulated"]
            .iter()
            .zip(whole.iter().zip(&windowed))
        {
            assert_eq!(a, b, "{what} (n = {n}): windows differ");
        }
        // The norm against a CPU sum in f64 (both gradients' squares).
        let want: f64 = g0
            .iter()
            .chain(&p0)
            .map(|&x| (x as f64) * (x as f64))
            .sum::<f64>()
            .sqrt();
        let got = f32::from_bits(windowed[0][0]) as f64;
        assert!((got - want).abs() <= 1e-5 * want, "norm {got} vs {want}");
    }
}

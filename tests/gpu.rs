//! The GPU context: errors are results, the pool reuses buffers, uploads and
//! readbacks round-trip.
mod common;
use clip_wgpu::gpu::Shader;
use clip_wgpu::ops::elementwise;
use clip_wgpu::Tensor;
use common::*;

#[test]
fn tensor_round_trip() {
    let Some(gpu) = gpu() else { return };
    let data: Vec<f32> = (0..257).map(|i| i as f32 * 0.5 - 3.0).collect();
    let t = Tensor::from_slice(&gpu, &data, &[257]).unwrap();
    assert_eq!(t.to_vec().unwrap(), data);
    let z = Tensor::zeros(&gpu, &[7, 11]).unwrap();
    assert!(z.to_vec().unwrap().iter().all(|&v| v == 0.0));
    assert!(Tensor::from_slice(&gpu, &data, &[7]).is_err());
}

#[test]
fn pool_reuses_buffers_in_a_steady_loop() {
    let Some(gpu) = own_gpu() else { return };
    let a = Tensor::from_slice(&gpu, &[1.0; 1000], &[1000]).unwrap();
    let step = || {
        let b = elementwise::add(&a, &a).unwrap();
        let c = elementwise::add(&b, &a).unwrap();
        c.to_vec().unwrap()
    };
    step();
    let before = gpu.pool_stats().allocations;
    for _ in 0..5 {
        assert_eq!(step()[999], 3.0);
    }
    assert_eq!(
        gpu.pool_stats().allocations,
        before,
        "steady loop allocated"
    );
}

#[test]
fn bad_shader_is_an_error_not_a_panic() {
    let Some(gpu) = gpu() else { return };
    let bad = Shader {
        name: "broken",
        source: "@compute @workgroup_size(1) fn main() { let x: f32 = 1u; }",
    };
    let err = gpu
        .dispatch(&bad, "main", &[0], &[], [1, 1, 1])
        .unwrap_err();
    let msg = format!("{err:#}");
    assert!(msg.contains("broken"), "message names the shader: {msg}");
    // The device still works afterwards.
    gpu.sync().unwrap();
}

#[test]
fn oversized_tensor_is_an_error() {
    let Some(gpu) = gpu() else { return };
    let n = (gpu.limits.max_buffer_size / 4 + 16) as usize;
    let err = Tensor::empty(&gpu, &[n]).unwrap_err();
    assert!(format!("{err:#}").contains("smaller batch"), "{err:#}");
}

#[test]
fn wrong_bindings_are_an_error() {
    let Some(gpu) = gpu() else { return };
    let a = Tensor::zeros(&gpu, &[4]).unwrap();
    // elementwise::add binds three buffers; give it one.
    let shader = Shader {
        name: "elementwise",
        source: include_str!("../shaders/elementwise.wgsl"),
    };
    let err = gpu
        .dispatch(
            &shader,
            "add",
            &[4, 4, 0, 0],
            &[Some(a.buffer())],
            [1, 1, 1],
        )
        .unwrap_err();
    assert!(format!("{err:#}").contains("elementwise"), "{err:#}");
    gpu.sync().unwrap();
}

/// Uploads are staged in the command stream: a write lands after the work
/// recorded before it and before the work recorded after it, without a
/// flush in between (one submit), also for uploads that fill several
/// staging chunks and for one too large to stage.
#[test]
fn writes_are_ordered_with_recorded_work() {
    let Some(gpu) = common::own_gpu() else { return };
    let x = Tensor::from_slice(&gpu, &[1.0, 2.0, 3.0], &[3]).unwrap();
    let before = elementwise::add(&x, &x).unwrap(); // recorded with x = 1, 2, 3
    x.write(&[10.0, 20.0, 30.0]).unwrap();
    let after = elementwise::add(&x, &x).unwrap();
    let submits = gpu.submit_count();
    assert_eq!(before.to_vec().unwrap(), vec![2.0, 4.0, 6.0]);
    assert_eq!(gpu.submit_count(), submits + 1, "the write flushed early");
    assert_eq!(after.to_vec().unwrap(), vec![20.0, 40.0, 60.0]);
    // 3 MiB each: several staging chunks in one submit (and past the
    // staging bound, which submits early), then one too large to stage.
    let sizes = [3 << 18, 3 << 18, 3 << 18, 3 << 18, 3 << 18, 5 << 18];
    let inputs: Vec<Vec<f32>> = sizes
        .iter()
        .map(|&n| (0..n).map(|i| ((i + n) % 1000) as f32).collect())
        .collect();
    let sums: Vec<Tensor> = inputs
        .iter()
        .map(|d| {
            let t = Tensor::from_slice(&gpu, d, &[d.len()]).unwrap();
            elementwise::add(&t, &t).unwrap()
        })
        .collect();
    for (d, s) in inputs.iter().zip(&sums) {
        let got = s.to_vec().unwrap();
        assert!(
            got.iter().zip(d).all(|(g, v)| *g == 2.0 * v),
            "upload of {} floats",
            d.len()
        );
    }
}

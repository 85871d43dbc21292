//! `cargo bench --bench kernels [FILTER]`: the kernel table of
//! `clip-wgpu bench` on the default adapter (median wall times).

use clip_wgpu::bench;
use clip_wgpu::gpu::AdapterRequest;
use clip_wgpu::Gpu;

fn main() {
    let filter = std::env::args().skip(1).find(|a| !a.starts_with('-'));
    let gpu = Gpu::new(&AdapterRequest::default().with_env().unwrap()).expect("adapter");
    println!(
        "adapter: {} ({:?}, {:?})",
        gpu.info.name, gpu.info.backend, gpu.info.device_type
    );
    let rows = bench::kernel_table(&gpu, &bench::tiny_config(), 32, 5).expect("bench");
    let rows: Vec<_> = rows
        .into_iter()
        .filter(|m| filter.as_deref().is_none_or(|f| m.kernel.contains(f)))
        .collect();
    bench::print_table(&rows);
}

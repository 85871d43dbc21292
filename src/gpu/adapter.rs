//! Adapter choice: which backend and which physical device to run on.

use anyhow::{bail, Context, Result};

/// How the user asked for an adapter (flags `--backend`/`--adapter`, or the
/// env vars `CLIP_WGPU_BACKEND`/`CLIP_WGPU_ADAPTER`).
#[derive(Clone, Debug, Default)]
pub struct AdapterRequest {
    /// `vulkan`, `metal`, `dx12`, `gl` or `all` (default).
    pub backend: Option<String>,
    /// Index into the list `clip-wgpu info` prints (after the backend filter).
    pub index: Option<usize>,
}

impl AdapterRequest {
    /// Fill unset fields from `CLIP_WGPU_BACKEND` / `CLIP_WGPU_ADAPTER`.
    pub fn with_env(mut self) -> Result<Self> {
        if self.backend.is_none() {
            self.backend = std::env::var("CLIP_WGPU_BACKEND")
                .ok()
                .filter(|s| !s.is_empty());
        }
        if self.index.is_none() {
            if let Ok(s) = std::env::var("CLIP_WGPU_ADAPTER") {
                if !s.is_empty() {
                    self.index = Some(s.parse().with_context(|| {
                        format!("CLIP_WGPU_ADAPTER={s:?} is not an adapter index (0, 1, ...)")
                    })?);
                }
            }
        }
        Ok(self)
    }

    pub fn backends(&self) -> Result<wgpu::Backends> {
        parse_backend(self.backend.as_deref().unwrap_or("all"))
    }
}

pub fn parse_backend(s: &str) -> Result<wgpu::Backends> {
    Ok(match s.to_ascii_lowercase().as_str() {
        "all" | "" => wgpu::Backends::all(),
        "vulkan" | "vk" => wgpu::Backends::VULKAN,
        "metal" | "mtl" => wgpu::Backends::METAL,
        "dx12" | "d3d12" => wgpu::Backends::DX12,
        "gl" | "gles" | "opengl" => wgpu::Backends::GL,
        other => bail!("unknown backend {other:?}: expected vulkan, metal, dx12, gl or all"),
    })
}

pub fn instance(backends: wgpu::Backends) -> wgpu::Instance {
    let mut desc = wgpu::InstanceDescriptor::new_without_display_handle();
    desc.backends = backends;
    wgpu::Instance::new(desc)
}

/// Every adapter the backends expose, in a stable order.
/// For `all`, the native APIs are asked first and GL only when they find
/// nothing (GL is wgpu's fallback and probing it is noisy on headless Linux).
pub fn enumerate(backends: wgpu::Backends) -> Vec<wgpu::Adapter> {
    let get = |b: wgpu::Backends| pollster::block_on(instance(b).enumerate_adapters(b));
    if backends == wgpu::Backends::all() {
        let primary = get(wgpu::Backends::PRIMARY);
        if !primary.is_empty() {
            return primary;
        }
        return get(wgpu::Backends::GL);
    }
    get(backends)
}

/// Higher is better: real GPUs first, CPU adapters (lavapipe) last; native
/// APIs before GL, which is a fallback in wgpu.
fn rank(a: &wgpu::Adapter) -> (u8, u8) {
    let info = a.get_info();
    let ty = match info.device_type {
        wgpu::DeviceType::DiscreteGpu => 4,
        wgpu::DeviceType::IntegratedGpu => 3,
        wgpu::DeviceType::VirtualGpu => 2,
        wgpu::DeviceType::Other => 1,
        wgpu::DeviceType::Cpu => 0,
    };
    let be = match info.backend {
        wgpu::Backend::Vulkan | wgpu::Backend::Metal | wgpu::Backend::Dx12 => 1,
        _ => 0,
    };
    (ty, be)
}

/// Pick the adapter the request names, or the best one found.
pub fn choose(req: &AdapterRequest) -> Result<wgpu::Adapter> {
    let backends = req.backends()?;
    let mut adapters = enumerate(backends);
    if adapters.is_empty() {
        bail!(
            "no GPU adapter found for backend {:?}. On Linux without a GPU install Mesa's \
             lavapipe: `apt-get install mesa-vulkan-drivers libvulkan1`",
            req.backend.as_deref().unwrap_or("all")
        );
    }
    if let Some(i) = req.index {
        let n = adapters.len();
        if i >= n {
            bail!("adapter index {i} is out of range: {n} adapter(s) found (see `clip-wgpu info`)");
        }
        return Ok(adapters.swap_remove(i));
    }
    // Stable choice: max by rank, first one wins ties.
    let mut best = 0;
    for (i, a) in adapters.iter().enumerate() {
        if rank(a) > rank(&adapters[best]) {
            best = i;
        }
    }
    Ok(adapters.swap_remove(best))
}

/// The adapter of the process with local rank `local_rank` (its index
/// among the ranks on this machine): the best kind found (the default
/// choice's backend and device type), one per rank in turn; ranks share
/// them when there are more ranks than adapters. Index as `clip-wgpu info`
/// lists them.
pub fn index_for_local_rank(req: &AdapterRequest, local_rank: usize) -> Result<usize> {
    let adapters = enumerate(req.backends()?);
    let Some(best) = adapters.iter().map(rank).max() else {
        bail!("no GPU adapter found (see `clip-wgpu info`)");
    };
    let same: Vec<usize> = (0..adapters.len())
        .filter(|&i| rank(&adapters[i]) == best)
        .collect();
    Ok(same[local_rank % same.len()])
}

/// One human-readable paragraph for `clip-wgpu info`.
pub fn describe(i: usize, a: &wgpu::Adapter) -> String {
    let info = a.get_info();
    let l = a.limits();
    let f = a.features();
    format!(
        "[{i}] {name}\n    backend: {:?}  type: {:?}  vendor: 0x{:04x}  device: 0x{:04x}\n    \
         driver: {} {}\n    limits: max_buffer_size {} MiB, max_storage_buffer_binding_size {} MiB, \
         max_compute_workgroup_size {}x{}x{} (invocations {}), workgroup storage {} KiB, \
         max_workgroups_per_dimension {}\n    features: {:?}",
        info.backend,
        info.device_type,
        info.vendor,
        info.device,
        info.driver,
        info.driver_info,
        l.max_buffer_size >> 20,
        l.max_storage_buffer_binding_size >> 20,
        l.max_compute_workgroup_size_x,
        l.max_compute_workgroup_size_y,
        l.max_compute_workgroup_size_z,
        l.max_compute_invocations_per_workgroup,
        l.max_compute_workgroup_storage_size >> 10,
        l.max_compute_workgroups_per_dimension,
        f,
        name = info.name,
    )
}

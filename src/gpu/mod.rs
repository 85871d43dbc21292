//! The GPU context: device and queue, a pipeline cache, a buffer pool, a
//! command recorder that batches many dispatches into one submit, and
//! upload/readback. wgpu errors come back as `anyhow` errors, never panics.

pub mod adapter;
pub mod pool;
pub mod profile;
pub mod settings;
pub mod tune;

use anyhow::{anyhow, bail, Context, Result};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};

pub use adapter::AdapterRequest;
pub use pool::PoolStats;
use pool::{bucket, Pool, STORAGE_USAGE};
pub use profile::KernelTime;
use profile::Profiler;
pub use settings::Settings;

/// One WGSL module: its name (for errors and the cache) and its source
/// (see `crate::shaders`).
pub struct Shader {
    pub name: &'static str,
    pub source: &'static str,
}

/// Kernel design differs by adapter: CPU adapters (lavapipe) want
/// register-blocked kernels without workgroup memory, GPUs want tiles.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceClass {
    Cpu,
    Gpu,
}

/// Uniform parameters of one dispatch live in a slot of a chunk; chunks are
/// reused across submits so a steady step allocates no parameter buffers.
const PARAM_CHUNK: u64 = 64 * 1024;
/// Uploads up to this size are staged in the recorder (see `write`); larger
/// ones go straight to the queue after a flush.
const UPLOAD_CHUNK: u64 = 4 << 20;
/// Chunks of staged uploads one submit may hold.
const UPLOAD_CHUNKS: usize = 4;
/// Largest parameter block a kernel may take, in u32 words.
pub const MAX_PARAMS: usize = 32;

struct ParamChunk {
    buf: wgpu::Buffer,
    data: Vec<u8>,
}

#[derive(Default)]
struct Recorder {
    encoder: Option<wgpu::CommandEncoder>,
    chunks: Vec<ParamChunk>,
    chunk: usize,
    offset: u64,
    submits: u64,
    /// Host-staged uploads: like the parameter chunks, written to their GPU
    /// buffers just before the submit and copied into place by commands in
    /// order with the dispatches, so an upload needs no flush.
    uploads: Vec<ParamChunk>,
    upload_chunk: usize,
    upload_offset: u64,
    /// MAP_READ staging buffers for readback, by size.
    staging: HashMap<u64, Vec<wgpu::Buffer>>,
    profile: Option<Profiler>,
    /// Timestamp query set and buffers of the last profile, kept for reuse.
    spare_timestamps: Option<profile::Timestamps>,
    /// The latest submission (for [`Gpu::flush_paced`]).
    last_submission: Option<wgpu::SubmissionIndex>,
}

pub struct Gpu {
    pub device: wgpu::Device,
    pub queue: wgpu::Queue,
    pub info: wgpu::AdapterInfo,
    pub limits: wgpu::Limits,
    pub features: wgpu::Features,
    pub class: DeviceClass,
    /// The cooperative-matrix size (8 or 16) the matmul_coop kernels can use
    /// on this device, if any (see `coop_size`).
    pub coop: Option<u32>,
    pool: Pool,
    modules: Mutex<HashMap<&'static str, wgpu::ShaderModule>>,
    pipelines: Mutex<HashMap<String, wgpu::ComputePipeline>>,
    rec: Mutex<Recorder>,
    /// First error wgpu reported outside an error scope.
    error: Arc<Mutex<Option<String>>>,
    /// Bound in place of an absent optional input (e.g. no bias): one per
    /// binding slot, so that two absent inputs of one dispatch (one
    /// read-only, one read-write) never share a buffer.
    dummies: Vec<wgpu::Buffer>,
    /// The user's settings (kernel choices, tuning, text length, profiles).
    settings: RwLock<Arc<Settings>>,
    tune: RwLock<tune::TuneCache>,
    /// Test override of the binding limit (see `window_bytes`).
    binding_limit: std::sync::atomic::AtomicU64,
    made: Mutex<Vec<PipelineSpec>>,
}

/// One compute pipeline as created: the WGSL module, its entry point and
/// the override constants it was specialised with.
#[derive(Clone, Debug)]
pub struct PipelineSpec {
    pub shader: &'static str,
    pub source: &'static str,
    pub entry: String,
    pub constants: Vec<(String, f64)>,
}

/// A byte range of a buffer bound to one slot of a dispatch.
#[derive(Clone, Copy)]
pub struct Window<'a> {
    pub buffer: &'a wgpu::Buffer,
    pub offset: u64,
    pub size: u64,
}

impl<'a> Window<'a> {
    pub fn whole(buffer: &'a wgpu::Buffer) -> Window<'a> {
        Window {
            buffer,
            offset: 0,
            size: buffer.size(),
        }
    }

    /// f32 elements [first, first + count) of `buffer`, or all of it when
    /// that is everything `all` holds (one window).
    pub fn elems(buffer: &'a wgpu::Buffer, first: usize, count: usize, all: usize) -> Window<'a> {
        if first == 0 && count == all {
            return Window::whole(buffer);
        }
        Window {
            buffer,
            offset: (first * 4) as u64,
            size: (count * 4) as u64,
        }
    }
}

/// The size S of the f16 x f16 -> f32 SxSxS cooperative-matrix operation the
/// adapter offers (16 preferred: Vulkan tensor cores; 8: Apple's simdgroup
/// matrices), where it also has half floats and one subgroup size (a
/// matmul_coop workgroup is one subgroup).
fn coop_size(adapter: &wgpu::Adapter, info: &wgpu::AdapterInfo) -> Option<u32> {
    let f = adapter.features();
    let needed = wgpu::Features::EXPERIMENTAL_COOPERATIVE_MATRIX | wgpu::Features::SHADER_F16;
    if !f.contains(needed)
        || info.subgroup_min_size == 0
        || info.subgroup_min_size != info.subgroup_max_size
    {
        return None;
    }
    let props = adapter.cooperative_matrix_properties();
    [16, 8].into_iter().find(|&s| {
        props.iter().any(|p| {
            (p.m_size, p.n_size, p.k_size) == (s, s, s)
                && p.ab_type == wgpu::wgt::CooperativeScalarType::F16
                && p.cr_type == wgpu::wgt::CooperativeScalarType::F32
        })
    })
}

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

impl Gpu {
    /// Open the adapter the request names (or the best one) with its own
    /// limits: CLIP activations exceed wgpu's 128 MiB default binding size.
    /// Settings come from the environment ([`Settings::from_env`]).
    pub fn new(req: &AdapterRequest) -> Result<Arc<Gpu>> {
        Self::with_settings(req, Settings::from_env()?)
    }

    /// `new` with the given settings (the environment's are not read).
    pub fn with_settings(req: &AdapterRequest, settings: Settings) -> Result<Arc<Gpu>> {
        let adapter = adapter::choose(req)?;
        Self::from_adapter_with(adapter, settings)
    }

    /// A context on `adapter`, with settings from the environment.
    pub fn from_adapter(adapter: wgpu::Adapter) -> Result<Arc<Gpu>> {
        Self::from_adapter_with(adapter, Settings::from_env()?)
    }

    pub fn from_adapter_with(adapter: wgpu::Adapter, settings: Settings) -> Result<Arc<Gpu>> {
        let info = adapter.get_info();
        let limits = adapter.limits();
        let wanted = wgpu::Features::TIMESTAMP_QUERY
            | wgpu::Features::TIMESTAMP_QUERY_INSIDE_ENCODERS
            | wgpu::Features::TIMESTAMP_QUERY_INSIDE_PASSES
            | wgpu::Features::SUBGROUP;
        let mut features = adapter.features() & wanted;
        let coop = coop_size(&adapter, &info);
        let mut experimental = wgpu::ExperimentalFeatures::disabled();
        if coop.is_some() {
            features |=
                wgpu::Features::EXPERIMENTAL_COOPERATIVE_MATRIX | wgpu::Features::SHADER_F16;
            // SAFETY: wgpu marks cooperative matrices experimental (their
            // validation is incomplete). Only matmul_coop uses them; naga
            // validates it (tests/shaders.rs) and it never runs unless forced.
            experimental = unsafe { wgpu::ExperimentalFeatures::enabled() };
        }
        let (device, queue) = pollster::block_on(adapter.request_device(&wgpu::DeviceDescriptor {
            label: Some("clip-wgpu"),
            required_features: features,
            required_limits: limits.clone(),
            experimental_features: experimental,
            memory_hints: wgpu::MemoryHints::Performance,
            trace: wgpu::Trace::Off,
        }))
        .with_context(|| format!("opening device on adapter {:?}", info.name))?;
        let error = Arc::new(Mutex::new(None::<String>));
        let slot = error.clone();
        device.on_uncaptured_error(Arc::new(move |e: wgpu::Error| {
            let mut g = slot.lock().unwrap();
            if g.is_none() {
                *g = Some(describe_error(&e));
            }
        }));
        let lost = error.clone();
        device.set_device_lost_callback(move |reason, msg| {
            let mut g = lost.lock().unwrap();
            if g.is_none() {
                *g = Some(format!("GPU device lost ({reason:?}): {msg}"));
            }
        });
        let dummies = (0..16)
            .map(|_| {
                device.create_buffer(&wgpu::BufferDescriptor {
                    label: Some("dummy"),
                    size: 16,
                    usage: STORAGE_USAGE,
                    mapped_at_creation: false,
                })
            })
            .collect();
        let class = if info.device_type == wgpu::DeviceType::Cpu {
            DeviceClass::Cpu
        } else {
            DeviceClass::Gpu
        };
        Ok(Arc::new(Gpu {
            device,
            queue,
            limits,
            features,
            class,
            coop,
            pool: Pool::default(),
            modules: Mutex::default(),
            pipelines: Mutex::default(),
            rec: Mutex::default(),
            tune: RwLock::new(tune::TuneCache::open(
                &info,
                tune::fnv(&[
                    crate::shaders::source("matmul"),
                    crate::shaders::source("matmul_vec4"),
                    crate::shaders::source("matmul_sg"),
                    crate::shaders::source("matmul_blocked"),
                    crate::shaders::source("attention_fused"),
                    crate::shaders::source("attention_tiled"),
                ]),
                settings.cache_dir.as_deref(),
            )),
            settings: RwLock::new(Arc::new(settings)),
            info,
            error,
            dummies,
            binding_limit: std::sync::atomic::AtomicU64::new(u64::MAX),
            made: Mutex::default(),
        }))
    }

    /// Fail with the first asynchronous wgpu error, if one happened.
    pub fn check(&self) -> Result<()> {
        if let Some(e) = self.error.lock().unwrap().clone() {
            bail!("{e}");
        }
        Ok(())
    }

    /// The user's settings: what ops and models read instead of the
    /// environment.
    pub fn settings(&self) -> Arc<Settings> {
        self.settings.read().unwrap().clone()
    }

    /// Replace the settings (work already recorded keeps its choices; a new
    /// `cache_dir` moves the measured choices' file there, re-reading it).
    pub fn set_settings(&self, settings: Settings) {
        let mut cur = self.settings.write().unwrap();
        if settings.cache_dir != cur.cache_dir {
            let mut tune = self.tune.write().unwrap();
            *tune = tune.moved_to(settings.cache_dir.as_deref());
        }
        *cur = Arc::new(settings);
    }

    /// A kernel choice measured earlier on this adapter (see `tune`).
    pub fn tuned(&self, key: &str) -> Option<String> {
        self.tune.read().unwrap().get(key)
    }

    pub fn set_tuned(&self, key: &str, value: &str) {
        self.tune.read().unwrap().set(key, value)
    }

    /// The kernel choices (tuning cache entries) this process has used.
    pub fn kernel_choices(&self) -> std::collections::BTreeMap<String, String> {
        self.tune.read().unwrap().used()
    }

    /// Use these kernel choices wherever they name a kernel that runs here
    /// (a resumed run's, from its checkpoint), whatever this machine measured.
    pub fn pin_kernel_choices(&self, entries: &std::collections::BTreeMap<String, String>) {
        self.tune.read().unwrap().pin(entries)
    }

    /// Where measured kernel choices are kept, if anywhere.
    pub fn tune_cache_path(&self) -> Option<std::path::PathBuf> {
        self.tune.read().unwrap().path().cloned()
    }

    /// Release every free buffer the pool holds: for a caller moving on to
    /// shapes that will not come back (the pool keeps buffers by exact
    /// size, so their sizes would only be memory).
    pub fn trim_pool(&self) {
        self.pool.trim();
    }

    pub fn pool_stats(&self) -> PoolStats {
        self.pool.stats()
    }

    /// A storage buffer of at least `bytes`, from the pool when one is free.
    pub(crate) fn alloc(&self, bytes: u64) -> Result<wgpu::Buffer> {
        let size = bucket(bytes);
        if let Some(b) = self.pool.take(size) {
            return Ok(b);
        }
        if size > self.limits.max_buffer_size {
            bail!(
                "a {} MiB tensor exceeds this adapter's max_buffer_size of {} MiB: try a smaller batch",
                size >> 20,
                self.limits.max_buffer_size >> 20
            );
        }
        let create = || {
            let scope = self.device.push_error_scope(wgpu::ErrorFilter::OutOfMemory);
            let buf = self.device.create_buffer(&wgpu::BufferDescriptor {
                label: None,
                size,
                usage: STORAGE_USAGE,
                mapped_at_creation: false,
            });
            match pollster::block_on(scope.pop()) {
                Some(e) => Err(e),
                None => Ok(buf),
            }
        };
        let mut made = create();
        if made.is_err() && self.pool.stats().free_bytes > 0 {
            // The pool keeps free buffers by exact size, and a step that mixes
            // shapes (accumulation's passes and its N x N loss) may hold many
            // that fit nothing: release them and try once more.
            self.pool.trim();
            self.device
                .poll(wgpu::PollType::wait_indefinitely())
                .map_err(|e| anyhow!("waiting for the GPU: {e}"))?;
            made = create();
        }
        let buf = match made {
            Ok(buf) => buf,
            Err(e) => {
                self.pool.trim();
                bail!(
                "GPU out of memory allocating {:.1} MiB (pool holds {:.1} MiB): try a smaller batch \
                 ({})",
                size as f64 / 1048576.0,
                self.pool.stats().held_bytes as f64 / 1048576.0,
                    describe_error(&e)
                );
            }
        };
        self.pool.note_alloc(size);
        Ok(buf)
    }

    pub(crate) fn release(&self, buf: wgpu::Buffer) {
        self.pool.give(buf);
    }

    /// The pipeline for one entry point, compiled once and cached.
    fn pipeline(
        &self,
        shader: &Shader,
        entry: &str,
        constants: &[(&str, f64)],
    ) -> Result<wgpu::ComputePipeline> {
        let key = format!("{}::{}{:?}", shader.name, entry, constants);
        if let Some(p) = self.pipelines.lock().unwrap().get(&key) {
            return Ok(p.clone());
        }
        let scope = self.device.push_error_scope(wgpu::ErrorFilter::Validation);
        let module = {
            let mut m = self.modules.lock().unwrap();
            m.entry(shader.name)
                .or_insert_with(|| {
                    self.device
                        .create_shader_module(wgpu::ShaderModuleDescriptor {
                            label: Some(shader.name),
                            source: wgpu::ShaderSource::Wgsl(shader.source.into()),
                        })
                })
                .clone()
        };
        let pipeline = self
            .device
            .create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                label: Some(&key),
                layout: None,
                module: &module,
                entry_point: Some(entry),
                compilation_options: wgpu::PipelineCompilationOptions {
                    constants,
                    zero_initialize_workgroup_memory: false,
                },
                cache: None,
            });
        if let Some(e) = pollster::block_on(scope.pop()) {
            bail!(
                "compiling shader {} entry point {entry}: {}",
                shader.name,
                describe_error(&e)
            );
        }
        self.pipelines.lock().unwrap().insert(key, pipeline.clone());
        self.made.lock().unwrap().push(PipelineSpec {
            shader: shader.name,
            source: shader.source,
            entry: entry.to_string(),
            constants: constants.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
        });
        Ok(pipeline)
    }

    /// Every pipeline this device has created (shader, entry point, override
    /// constants), in order: what a translation check must cover.
    pub fn pipelines_made(&self) -> Vec<PipelineSpec> {
        self.made.lock().unwrap().clone()
    }

    /// Record one dispatch. Binding 0 of every entry point is its uniform
    /// `Params`; bindings 1.. are the storage buffers in order (`None` binds a
    /// dummy for an absent optional input). Nothing runs until `flush`.
    pub fn dispatch(
        &self,
        shader: &Shader,
        entry: &str,
        params: &[u32],
        buffers: &[Option<&wgpu::Buffer>],
        groups: [u32; 3],
    ) -> Result<()> {
        self.dispatch_with(shader, entry, &[], params, buffers, groups)
    }

    /// `dispatch` with WGSL `override` constants (part of the cache key).
    pub fn dispatch_with(
        &self,
        shader: &Shader,
        entry: &str,
        constants: &[(&str, f64)],
        params: &[u32],
        buffers: &[Option<&wgpu::Buffer>],
        groups: [u32; 3],
    ) -> Result<()> {
        let whole: Vec<Option<Window>> = buffers.iter().map(|b| b.map(Window::whole)).collect();
        self.dispatch_windows(shader, entry, constants, params, &whole, groups)
    }

    /// Bytes of the largest binding window whose size and offsets are
    /// multiples of `unit` bytes and of the adapter's offset alignment: a
    /// tensor larger than the adapter's binding limit (lavapipe: 128 MiB,
    /// e.g. roberta-base's 154 MB word embedding) is worked on in windows
    /// of this size.
    pub fn window_bytes(&self, unit: u64) -> u64 {
        let align = (self.limits.min_storage_buffer_offset_alignment as u64).max(4);
        let step = unit / gcd(unit, align) * align;
        let limit = self
            .binding_limit
            .load(std::sync::atomic::Ordering::Relaxed)
            .min(self.limits.max_storage_buffer_binding_size);
        (limit / step).max(1) * step
    }

    /// `n` f32 elements as (first, count) windows the adapter can bind, each
    /// a multiple of `multiple` elements but the last; one window (0, n)
    /// when everything fits (also for n = 0).
    pub fn elem_windows(&self, n: usize, multiple: usize) -> Vec<(usize, usize)> {
        let per = (self.window_bytes(4 * multiple as u64) / 4) as usize;
        if n <= per {
            return vec![(0, n)];
        }
        (0..n)
            .step_by(per)
            .map(|e0| (e0, per.min(n - e0)))
            .collect()
    }

    /// Pretend the adapter binds at most `bytes` (tests of the windowed
    /// paths with small tensors).
    pub fn set_binding_limit(&self, bytes: u64) {
        self.binding_limit
            .store(bytes, std::sync::atomic::Ordering::Relaxed);
    }

    /// `dispatch_with` binding byte ranges of the buffers.
    pub fn dispatch_windows(
        &self,
        shader: &Shader,
        entry: &str,
        constants: &[(&str, f64)],
        params: &[u32],
        buffers: &[Option<Window>],
        groups: [u32; 3],
    ) -> Result<()> {
        assert!(
            params.len() <= MAX_PARAMS,
            "{}: too many params",
            shader.name
        );
        if groups.contains(&0) {
            return Ok(());
        }
        let max = self.limits.max_compute_workgroups_per_dimension;
        if groups.iter().any(|&g| g > max) {
            bail!(
                "{}::{entry}: dispatch {:?} exceeds the adapter's {max} workgroups per dimension",
                shader.name,
                groups
            );
        }
        let pipeline = self.pipeline(shader, entry, constants)?;
        let mut rec = self.rec.lock().unwrap();
        let (chunk, offset) = self.param_slot(&mut rec, params);
        let layout = pipeline.get_bind_group_layout(0);
        let mut entries = Vec::with_capacity(buffers.len() + 1);
        entries.push(wgpu::BindGroupEntry {
            binding: 0,
            resource: wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                buffer: &rec.chunks[chunk].buf,
                offset,
                size: wgpu::BufferSize::new((MAX_PARAMS * 4) as u64),
            }),
        });
        for (i, b) in buffers.iter().enumerate() {
            let resource = match b {
                Some(w) => wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                    buffer: w.buffer,
                    offset: w.offset,
                    size: wgpu::BufferSize::new(w.size),
                }),
                None => self.dummies[i].as_entire_binding(),
            };
            entries.push(wgpu::BindGroupEntry {
                binding: i as u32 + 1,
                resource,
            });
        }
        let scope = self.device.push_error_scope(wgpu::ErrorFilter::Validation);
        let bind = self.device.create_bind_group(&wgpu::BindGroupDescriptor {
            label: None,
            layout: &layout,
            entries: &entries,
        });
        if let Some(e) = pollster::block_on(scope.pop()) {
            bail!(
                "binding {} buffer(s) to shader {} entry point {entry}: {}",
                buffers.len(),
                shader.name,
                describe_error(&e)
            );
        }
        let label = rec
            .profile
            .as_ref()
            .map(|_| profile_label(shader, entry, constants, params, &self.settings()));
        let wall = rec.profile.as_ref().is_some_and(|p| p.timestamps.is_none());
        if rec
            .profile
            .as_ref()
            .is_some_and(|p| p.pending.len() == profile::CAPACITY)
        {
            self.flush_locked(&mut rec)?;
        }
        if wall {
            // Time this dispatch alone: finish what came before it first.
            self.flush_locked(&mut rec)?;
            self.wait()?;
        }
        let t0 = std::time::Instant::now();
        {
            let Recorder {
                encoder, profile, ..
            } = &mut *rec;
            let enc = encoder.get_or_insert_with(|| {
                self.device
                    .create_command_encoder(&wgpu::CommandEncoderDescriptor::default())
            });
            let timestamp_writes = profile.as_ref().and_then(|p| {
                let ts = p.timestamps.as_ref()?;
                let i = (p.pending.len() * 2) as u32;
                Some(wgpu::ComputePassTimestampWrites {
                    query_set: &ts.set,
                    beginning_of_pass_write_index: Some(i),
                    end_of_pass_write_index: Some(i + 1),
                })
            });
            let mut pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor {
                label: None,
                timestamp_writes,
            });
            pass.set_pipeline(&pipeline);
            pass.set_bind_group(0, &bind, &[]);
            pass.dispatch_workgroups(groups[0], groups[1], groups[2]);
        }
        if let Some(label) = label {
            if wall {
                self.flush_locked(&mut rec)?;
                self.wait()?;
                let dt = t0.elapsed().as_secs_f64();
                rec.profile.as_mut().unwrap().add(&label, dt);
            } else {
                rec.profile.as_mut().unwrap().pending.push(label);
            }
        }
        Ok(())
    }

    /// Start timing each dispatch by kernel (timestamp queries where the
    /// adapter has them and `timestamps` is set, else wall time per dispatch).
    /// Slows the work it measures: every flush waits.
    pub fn profile_start(&self, timestamps: bool) -> Result<()> {
        self.sync()?;
        let mut rec = self.rec.lock().unwrap();
        let ts = (timestamps && self.has_timestamps()).then(|| {
            rec.spare_timestamps
                .take()
                .unwrap_or_else(|| profile::Timestamps::new(&self.device, &self.queue))
        });
        rec.profile = Some(Profiler::new(ts));
        Ok(())
    }

    /// Stop profiling; total time per kernel since `profile_start`.
    pub fn profile_stop(&self) -> Result<Vec<KernelTime>> {
        self.sync()?;
        let mut rec = self.rec.lock().unwrap();
        let Some(p) = rec.profile.take() else {
            return Ok(Vec::new());
        };
        let report = p.report();
        rec.spare_timestamps = p.into_timestamps();
        Ok(report)
    }

    /// Whether kernels may use subgroup operations with 8 lanes a subgroup
    /// (llvmpipe on AVX2: the matmul_sg kernels).
    pub fn subgroups_of_8(&self) -> bool {
        self.features.contains(wgpu::Features::SUBGROUP)
            && self.info.subgroup_min_size == 8
            && self.info.subgroup_max_size == 8
    }

    /// Whether a profile is being recorded.
    pub fn profiling(&self) -> bool {
        self.rec.lock().unwrap().profile.is_some()
    }

    /// Whether kernel times come from GPU timestamps (else wall time).
    pub fn has_timestamps(&self) -> bool {
        self.features.contains(wgpu::Features::TIMESTAMP_QUERY)
    }

    fn wait(&self) -> Result<()> {
        self.device
            .poll(wgpu::PollType::wait_indefinitely())
            .map_err(|e| anyhow!("waiting for the GPU: {e}"))?;
        self.check()
    }

    fn encoder<'a>(&self, rec: &'a mut Recorder) -> &'a mut wgpu::CommandEncoder {
        rec.encoder.get_or_insert_with(|| {
            self.device
                .create_command_encoder(&wgpu::CommandEncoderDescriptor::default())
        })
    }

    fn param_slot(&self, rec: &mut Recorder, params: &[u32]) -> (usize, u64) {
        let align = (self.limits.min_uniform_buffer_offset_alignment as u64).max(16);
        let slot = ((MAX_PARAMS * 4) as u64).div_ceil(align) * align;
        if rec.offset + slot > PARAM_CHUNK {
            rec.chunk += 1;
            rec.offset = 0;
        }
        if rec.chunk == rec.chunks.len() {
            let buf = self.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("params"),
                size: PARAM_CHUNK,
                usage: wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
                mapped_at_creation: false,
            });
            rec.chunks.push(ParamChunk {
                buf,
                data: vec![0; PARAM_CHUNK as usize],
            });
        }
        let (c, o) = (rec.chunk, rec.offset);
        let bytes: &[u8] = bytemuck::cast_slice(params);
        rec.chunks[c].data[o as usize..o as usize + bytes.len()].copy_from_slice(bytes);
        rec.offset += slot;
        (c, o)
    }

    /// Record a zero fill (ordered with the dispatches around it).
    pub fn clear(&self, buf: &wgpu::Buffer) {
        let mut rec = self.rec.lock().unwrap();
        self.encoder(&mut rec).clear_buffer(buf, 0, None);
    }

    /// Record a buffer-to-buffer copy of `bytes` bytes.
    pub fn copy(&self, src: &wgpu::Buffer, dst: &wgpu::Buffer, bytes: u64) {
        let mut rec = self.rec.lock().unwrap();
        self.encoder(&mut rec)
            .copy_buffer_to_buffer(src, 0, dst, 0, bytes);
    }

    /// Record a copy of `bytes` bytes from `src` at `offset` to the start of `dst`.
    pub fn copy_range(&self, src: &wgpu::Buffer, offset: u64, dst: &wgpu::Buffer, bytes: u64) {
        self.copy_at(src, offset, dst, 0, bytes);
    }

    /// Record a copy of `bytes` bytes from `src` at `src_offset` to `dst` at
    /// `dst_offset` (offsets and size multiples of 4).
    pub fn copy_at(
        &self,
        src: &wgpu::Buffer,
        src_offset: u64,
        dst: &wgpu::Buffer,
        dst_offset: u64,
        bytes: u64,
    ) {
        let mut rec = self.rec.lock().unwrap();
        self.encoder(&mut rec)
            .copy_buffer_to_buffer(src, src_offset, dst, dst_offset, bytes);
    }

    /// Submit everything recorded so far (does not wait).
    pub fn flush(&self) -> Result<()> {
        let mut rec = self.rec.lock().unwrap();
        self.flush_locked(&mut rec)
    }

    fn flush_locked(&self, rec: &mut Recorder) -> Result<()> {
        if let Some(enc) = rec.encoder.take() {
            let used = rec.chunk + usize::from(rec.offset > 0);
            for c in &rec.chunks[..used] {
                self.queue.write_buffer(&c.buf, 0, &c.data);
            }
            let staged = rec.upload_chunk + usize::from(rec.upload_offset > 0);
            for (i, c) in rec.uploads[..staged].iter().enumerate() {
                let end = if i + 1 == staged && rec.upload_offset > 0 {
                    rec.upload_offset as usize
                } else {
                    c.data.len()
                };
                self.queue.write_buffer(&c.buf, 0, &c.data[..end]);
            }
            let mut enc = enc;
            if let Some(p) = &rec.profile {
                p.resolve(&mut enc);
            }
            rec.last_submission = Some(self.queue.submit([enc.finish()]));
            rec.submits += 1;
            if let Some(p) = &mut rec.profile {
                p.collect(&self.device)?;
            }
        }
        rec.chunk = 0;
        rec.offset = 0;
        rec.upload_chunk = 0;
        rec.upload_offset = 0;
        self.check()
    }

    /// Submit what is recorded, then wait for the submission before it (not
    /// this one): a long run of work split into pieces (the micro-batches of
    /// an accumulated step) keeps the GPU busy while at most two pieces are
    /// in flight, so the memory that recording holds (command buffers,
    /// uniforms, staged uploads) stays that of a piece, not of the run.
    pub fn flush_paced(&self) -> Result<()> {
        let mut rec = self.rec.lock().unwrap();
        if rec.encoder.is_none() {
            return Ok(()); // nothing recorded: the pace is unchanged
        }
        let previous = rec.last_submission.take();
        self.flush_locked(&mut rec)?;
        drop(rec);
        if let Some(index) = previous {
            self.device
                .poll(wgpu::PollType::Wait {
                    submission_index: Some(index),
                    timeout: None,
                })
                .map_err(|e| anyhow!("waiting for the GPU: {e}"))?;
        }
        self.check()
    }

    /// Submit and wait until the GPU is idle.
    pub fn sync(&self) -> Result<()> {
        self.flush()?;
        self.wait()
    }

    /// Copy host bytes into a buffer. Pending work is submitted first so that
    /// it still sees the old contents (queue writes land before the next submit).
    pub fn write(&self, buf: &wgpu::Buffer, data: &[u8]) -> Result<()> {
        if data.is_empty() {
            return Ok(());
        }
        let len = (data.len() as u64).next_multiple_of(4);
        if len > UPLOAD_CHUNK {
            self.flush()?;
            self.queue.write_buffer(buf, 0, data);
            return Ok(());
        }
        // Staged: copied into place in order with the recorded dispatches.
        let mut rec = self.rec.lock().unwrap();
        if rec.upload_offset + len > UPLOAD_CHUNK {
            rec.upload_chunk += 1;
            rec.upload_offset = 0;
            if rec.upload_chunk == UPLOAD_CHUNKS {
                // Bound the staging memory (e.g. loading a model): submit.
                self.flush_locked(&mut rec)?;
            }
        }
        if rec.upload_chunk == rec.uploads.len() {
            let buf = self.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("uploads"),
                size: UPLOAD_CHUNK,
                usage: wgpu::BufferUsages::COPY_SRC | wgpu::BufferUsages::COPY_DST,
                mapped_at_creation: false,
            });
            rec.uploads.push(ParamChunk {
                buf,
                data: vec![0; UPLOAD_CHUNK as usize],
            });
        }
        let (c, o) = (rec.upload_chunk, rec.upload_offset as usize);
        rec.uploads[c].data[o..o + data.len()].copy_from_slice(data);
        rec.upload_offset += len.next_multiple_of(wgpu::COPY_BUFFER_ALIGNMENT.max(4));
        let src = rec.uploads[c].buf.clone();
        let n = (data.len() as u64).next_multiple_of(wgpu::COPY_BUFFER_ALIGNMENT);
        self.encoder(&mut rec)
            .copy_buffer_to_buffer(&src, o as u64, buf, 0, n.min(buf.size()));
        Ok(())
    }

    /// Read `bytes` bytes back from a buffer (submits and waits).
    pub fn read(&self, buf: &wgpu::Buffer, bytes: u64) -> Result<Vec<u8>> {
        if bytes == 0 {
            return Ok(Vec::new());
        }
        let size = bucket(bytes);
        let mut rec = self.rec.lock().unwrap();
        let staging = match rec.staging.get_mut(&size).and_then(|v| v.pop()) {
            Some(b) => b,
            None => self.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("readback"),
                size,
                usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
                mapped_at_creation: false,
            }),
        };
        self.encoder(&mut rec)
            .copy_buffer_to_buffer(buf, 0, &staging, 0, size.min(buf.size()));
        self.flush_locked(&mut rec)?;
        let (tx, rx) = std::sync::mpsc::channel();
        staging.map_async(wgpu::MapMode::Read, .., move |r| {
            let _ = tx.send(r);
        });
        self.device
            .poll(wgpu::PollType::wait_indefinitely())
            .map_err(|e| anyhow!("waiting for the GPU: {e}"))?;
        self.check()?;
        rx.recv()
            .context("readback callback never ran")?
            .map_err(|e| anyhow!("mapping a readback buffer: {e}"))?;
        let out = staging
            .get_mapped_range(..bytes)
            .map_err(|e| anyhow!("reading a mapped buffer: {e:?}"))?
            .to_vec();
        staging.unmap();
        rec.staging.entry(size).or_default().push(staging);
        Ok(out)
    }

    /// Command buffers submitted since this context was made (for bench).
    pub fn submit_count(&self) -> u64 {
        self.rec.lock().unwrap().submits
    }

    /// Workgroup grid for `n` invocations of a 1-D kernel with `wg` threads
    /// per group; rows of the grid spill into y past the per-dimension limit.
    /// Kernels recover the index as `gid.x + gid.y * nwg.x * WG`.
    pub fn grid_1d(&self, n: usize, wg: u32) -> [u32; 3] {
        let groups = (n as u64).div_ceil(wg as u64).max(1);
        let max = self.limits.max_compute_workgroups_per_dimension as u64;
        if groups <= max {
            [groups as u32, 1, 1]
        } else {
            let y = groups.div_ceil(max);
            [groups.div_ceil(y) as u32, y as u32, 1]
        }
    }
}

/// Kernel name in profiles: shader, entry point and override constants
/// (and the parameter words, with `profile_params`).
fn profile_label(
    shader: &Shader,
    entry: &str,
    constants: &[(&str, f64)],
    params: &[u32],
    settings: &Settings,
) -> String {
    // Constants left at 0 are omitted and flags set to 1 show by name, so
    // specialized kernels keep short names.
    let mut s = format!("{}::{entry}", shader.name);
    for (k, v) in constants {
        match *v {
            0.0 => {}
            1.0 => s.push_str(&format!(" {k}")),
            _ => s.push_str(&format!(" {k}={v}")),
        }
    }
    if settings.profile_params {
        s.push_str(&format!(" {params:?}"));
    }
    s
}

fn describe_error(e: &wgpu::Error) -> String {
    match e {
        wgpu::Error::OutOfMemory { .. } => {
            "GPU out of memory: try a smaller batch (--per_device_train_batch_size)".into()
        }
        wgpu::Error::Validation { description, .. } => format!("wgpu validation: {description}"),
        wgpu::Error::Internal { description, .. } => format!("wgpu internal error: {description}"),
    }
}

//! Per-kernel GPU time for `clip-wgpu bench`: timestamp queries written at
//! the start and end of each dispatch's compute pass when the adapter has
//! TIMESTAMP_QUERY, otherwise wall time around a submit + wait of each
//! dispatch on its own. Off unless `Gpu::profile_start` turned it on.

use anyhow::{anyhow, Context, Result};
use std::collections::HashMap;

/// Dispatches recorded between two resolves of the query set.
pub(crate) const CAPACITY: usize = 1024;

/// Total time of one kernel (shader entry point) over a profiled span.
#[derive(Clone, Debug)]
pub struct KernelTime {
    pub kernel: String,
    pub calls: u64,
    pub seconds: f64,
}

pub(crate) struct Timestamps {
    pub(crate) set: wgpu::QuerySet,
    resolve: wgpu::Buffer,
    staging: wgpu::Buffer,
    period_ns: f64,
}

impl Timestamps {
    pub(crate) fn new(device: &wgpu::Device, queue: &wgpu::Queue) -> Timestamps {
        let bytes = (CAPACITY * 2 * 8) as u64;
        Timestamps {
            set: device.create_query_set(&wgpu::QuerySetDescriptor {
                label: Some("profile"),
                ty: wgpu::QueryType::Timestamp,
                count: (CAPACITY * 2) as u32,
            }),
            resolve: device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("profile resolve"),
                size: bytes,
                usage: wgpu::BufferUsages::QUERY_RESOLVE | wgpu::BufferUsages::COPY_SRC,
                mapped_at_creation: false,
            }),
            staging: device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("profile staging"),
                size: bytes,
                usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
                mapped_at_creation: false,
            }),
            period_ns: queue.get_timestamp_period() as f64,
        }
    }
}

pub(crate) struct Profiler {
    pub(crate) timestamps: Option<Timestamps>,
    /// Labels of the dispatches in the current encoder (timestamp mode).
    pub(crate) pending: Vec<String>,
    totals: HashMap<String, (u64, f64)>,
    /// First-seen order of kernels, for a stable report.
    order: Vec<String>,
}

impl Profiler {
    /// A profiler; timestamp mode with `timestamps`, whose query set and
    /// buffers are made once (`Timestamps::new`) and reused across profiles.
    pub(crate) fn new(timestamps: Option<Timestamps>) -> Profiler {
        Profiler {
            timestamps,
            pending: Vec::new(),
            totals: HashMap::new(),
            order: Vec::new(),
        }
    }

    pub(crate) fn add(&mut self, label: &str, seconds: f64) {
        let e = self.totals.entry(label.to_string()).or_insert_with(|| {
            self.order.push(label.to_string());
            (0, 0.0)
        });
        e.0 += 1;
        e.1 += seconds;
    }

    /// Before the encoder holding the pending dispatches is finished: copy
    /// their timestamps where `collect` can read them after the submit.
    pub(crate) fn resolve(&self, enc: &mut wgpu::CommandEncoder) {
        if let Some(ts) = &self.timestamps {
            let n = (self.pending.len() * 2) as u32;
            if n > 0 {
                enc.resolve_query_set(&ts.set, 0..n, &ts.resolve, 0);
                enc.copy_buffer_to_buffer(&ts.resolve, 0, &ts.staging, 0, n as u64 * 8);
            }
        }
    }

    /// After the submit: wait for the timestamps and add each pass's time.
    pub(crate) fn collect(&mut self, device: &wgpu::Device) -> Result<()> {
        let Some(ts) = &self.timestamps else {
            return Ok(());
        };
        if self.pending.is_empty() {
            return Ok(());
        }
        let n = self.pending.len() * 2;
        let (tx, rx) = std::sync::mpsc::channel();
        ts.staging
            .map_async(wgpu::MapMode::Read, ..(n as u64 * 8), move |r| {
                let _ = tx.send(r);
            });
        device
            .poll(wgpu::PollType::wait_indefinitely())
            .map_err(|e| anyhow!("waiting for the GPU: {e}"))?;
        rx.recv()
            .context("timestamp readback never ran")?
            .map_err(|e| anyhow!("mapping timestamps: {e}"))?;
        let ticks: Vec<u64> = {
            let view = ts
                .staging
                .get_mapped_range(..(n as u64 * 8))
                .map_err(|e| anyhow!("reading timestamps: {e:?}"))?;
            bytemuck::pod_collect_to_vec(&view)
        };
        ts.staging.unmap();
        let period = ts.period_ns;
        let labels = std::mem::take(&mut self.pending);
        for (i, label) in labels.iter().enumerate() {
            let dt = ticks[2 * i + 1].saturating_sub(ticks[2 * i]);
            self.add(label, dt as f64 * period * 1e-9);
        }
        Ok(())
    }

    /// The timestamp resources, for the next profile.
    pub(crate) fn into_timestamps(self) -> Option<Timestamps> {
        self.timestamps
    }

    pub(crate) fn report(&self) -> Vec<KernelTime> {
        self.order
            .iter()
            .map(|k| {
                let (calls, seconds) = self.totals[k];
                KernelTime {
                    kernel: k.clone(),
                    calls,
                    seconds,
                }
            })
            .collect()
    }
}

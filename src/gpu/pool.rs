//! Buffer pool: freed storage buffers are kept by byte size and handed out
//! again, so a training step that repeats the same shapes allocates nothing
//! after its first run.

use std::collections::HashMap;
use std::sync::Mutex;

/// Every pooled buffer can be a storage binding and a copy source/target.
pub const STORAGE_USAGE: wgpu::BufferUsages = wgpu::BufferUsages::STORAGE
    .union(wgpu::BufferUsages::COPY_SRC)
    .union(wgpu::BufferUsages::COPY_DST);

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PoolStats {
    /// Buffers created over the pool's life (a steady step adds none).
    pub allocations: u64,
    /// Bytes held by live and pooled buffers together.
    pub held_bytes: u64,
    /// The most bytes ever held.
    pub peak_bytes: u64,
    /// Bytes sitting free in the pool.
    pub free_bytes: u64,
    /// The most bytes ever in use at once (held minus free): what the work
    /// needed, whatever the pool keeps besides.
    pub live_peak_bytes: u64,
}

impl PoolStats {
    /// Bytes in use now (held minus free).
    pub fn live_bytes(&self) -> u64 {
        self.held_bytes - self.free_bytes
    }

    fn note_live(&mut self) {
        let live = self.held_bytes - self.free_bytes;
        self.live_peak_bytes = self.live_peak_bytes.max(live);
    }
}

#[derive(Default)]
pub struct Pool {
    inner: Mutex<PoolInner>,
}

#[derive(Default)]
struct PoolInner {
    free: HashMap<u64, Vec<wgpu::Buffer>>,
    stats: PoolStats,
}

/// Sizes are rounded so that near-equal requests share buckets and every
/// binding is a whole number of vec4s.
pub fn bucket(bytes: u64) -> u64 {
    bytes.max(16).div_ceil(16) * 16
}

impl Pool {
    /// A free buffer of exactly `size` bytes (already bucketed), if any.
    pub fn take(&self, size: u64) -> Option<wgpu::Buffer> {
        let mut g = self.inner.lock().unwrap();
        let b = g.free.get_mut(&size).and_then(|v| v.pop());
        if b.is_some() {
            g.stats.free_bytes -= size;
            g.stats.note_live();
        }
        b
    }

    pub fn note_alloc(&self, size: u64) {
        let mut g = self.inner.lock().unwrap();
        g.stats.allocations += 1;
        g.stats.held_bytes += size;
        g.stats.peak_bytes = g.stats.peak_bytes.max(g.stats.held_bytes);
        g.stats.note_live();
    }

    pub fn give(&self, buf: wgpu::Buffer) {
        let size = buf.size();
        let mut g = self.inner.lock().unwrap();
        g.stats.free_bytes += size;
        g.free.entry(size).or_default().push(buf);
    }

    /// Drop every free buffer (e.g. after an out-of-memory error).
    pub fn trim(&self) {
        let mut g = self.inner.lock().unwrap();
        let freed = g.stats.free_bytes;
        g.free.clear();
        g.stats.held_bytes -= freed;
        g.stats.free_bytes = 0;
    }

    pub fn stats(&self) -> PoolStats {
        self.inner.lock().unwrap().stats
    }
}

//! f32 tensor on the GPU: a pooled buffer plus a shape. Clones share the
//! buffer; the buffer goes back to the pool when the last clone drops.

use crate::gpu::Gpu;
use crate::precision::Precision;
use anyhow::{ensure, Result};
use std::sync::{Arc, OnceLock};

struct Storage {
    buf: Option<wgpu::Buffer>,
    gpu: Arc<Gpu>,
    /// Its 16-bit copy once one is made for the backward (`ops::convert`),
    /// so several ops that save the same activation share one copy.
    packed: OnceLock<(Precision, Tensor)>,
}

impl Drop for Storage {
    fn drop(&mut self) {
        if let Some(b) = self.buf.take() {
            self.gpu.release(b);
        }
    }
}

#[derive(Clone)]
pub struct Tensor {
    storage: Arc<Storage>,
    shape: Vec<usize>,
}

impl std::fmt::Debug for Tensor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Tensor{:?}", self.shape)
    }
}

impl Tensor {
    /// Uninitialised contents (a kernel will overwrite every element).
    pub fn empty(gpu: &Arc<Gpu>, shape: &[usize]) -> Result<Tensor> {
        let n: usize = shape.iter().product();
        let buf = gpu.alloc((n * 4) as u64)?;
        Ok(Tensor {
            storage: Arc::new(Storage {
                buf: Some(buf),
                gpu: gpu.clone(),
                packed: OnceLock::new(),
            }),
            shape: shape.to_vec(),
        })
    }

    pub fn zeros(gpu: &Arc<Gpu>, shape: &[usize]) -> Result<Tensor> {
        let t = Self::empty(gpu, shape)?;
        gpu.clear(t.buffer());
        Ok(t)
    }

    pub fn from_slice(gpu: &Arc<Gpu>, data: &[f32], shape: &[usize]) -> Result<Tensor> {
        let n: usize = shape.iter().product();
        ensure!(
            n == data.len(),
            "shape {shape:?} needs {n} values, got {}",
            data.len()
        );
        let t = Self::empty(gpu, shape)?;
        gpu.write(t.buffer(), bytemuck::cast_slice(data))?;
        Ok(t)
    }

    /// Integer data (token ids, indices) in the same kind of buffer; kernels
    /// read it as `array<u32>`.
    pub fn from_u32(gpu: &Arc<Gpu>, data: &[u32], shape: &[usize]) -> Result<Tensor> {
        Self::from_slice(gpu, bytemuck::cast_slice(data), shape)
    }

    pub fn scalar(gpu: &Arc<Gpu>, v: f32) -> Result<Tensor> {
        Self::from_slice(gpu, &[v], &[1])
    }

    /// Overwrite the contents from the host (same element count).
    pub fn write(&self, data: &[f32]) -> Result<()> {
        ensure!(
            data.len() == self.numel(),
            "writing {} values into a tensor of shape {:?}",
            data.len(),
            self.shape
        );
        self.gpu().write(self.buffer(), bytemuck::cast_slice(data))
    }

    pub fn to_vec(&self) -> Result<Vec<f32>> {
        let bytes = self.gpu().read(self.buffer(), (self.numel() * 4) as u64)?;
        Ok(bytemuck::pod_collect_to_vec(&bytes))
    }

    /// Rows `start..start + count` of the leading dimension, copied into a
    /// fresh tensor.
    pub fn rows_copy(&self, start: usize, count: usize) -> Result<Tensor> {
        let (n, row) = self.row_dims()?;
        ensure!(
            start + count <= n,
            "rows {start}..{} of a tensor of {n} rows",
            start + count
        );
        let mut shape = self.shape.clone();
        shape[0] = count;
        let t = Self::empty(self.gpu(), &shape)?;
        self.gpu().copy_at(
            self.buffer(),
            (start * row * 4) as u64,
            t.buffer(),
            0,
            (count * row * 4) as u64,
        );
        Ok(t)
    }

    /// Write `src` into rows `start..` of the leading dimension.
    pub fn write_rows(&self, start: usize, src: &Tensor) -> Result<()> {
        let (n, row) = self.row_dims()?;
        let (m, src_row) = src.row_dims()?;
        ensure!(
            row == src_row && start + m <= n,
            "cannot write {:?} at row {start} of {:?}",
            src.shape,
            self.shape
        );
        self.gpu().copy_at(
            src.buffer(),
            0,
            self.buffer(),
            (start * row * 4) as u64,
            (m * row * 4) as u64,
        );
        Ok(())
    }

    /// (leading dimension, elements per leading index).
    fn row_dims(&self) -> Result<(usize, usize)> {
        ensure!(!self.shape.is_empty(), "a scalar has no rows");
        let n = self.shape[0];
        Ok((n, self.numel() / n.max(1)))
    }

    /// Same buffer, new shape with the same element count.
    pub fn reshape(&self, shape: &[usize]) -> Result<Tensor> {
        let n: usize = shape.iter().product();
        ensure!(
            n == self.numel(),
            "cannot reshape {:?} into {shape:?}",
            self.shape
        );
        Ok(Tensor {
            storage: self.storage.clone(),
            shape: shape.to_vec(),
        })
    }

    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// Size of the last dimension.
    pub fn cols(&self) -> usize {
        *self.shape.last().unwrap_or(&1)
    }

    /// Product of all but the last dimension.
    pub fn rows(&self) -> usize {
        self.numel() / self.cols().max(1)
    }

    pub fn buffer(&self) -> &wgpu::Buffer {
        self.storage.buf.as_ref().expect("live tensor has a buffer")
    }

    pub fn gpu(&self) -> &Arc<Gpu> {
        &self.storage.gpu
    }

    /// True when no other tensor shares this buffer (safe to update in place).
    pub fn is_unique(&self) -> bool {
        Arc::strong_count(&self.storage) == 1
    }

    /// The slot for this buffer's 16-bit copy (see `ops::convert::save`).
    pub(crate) fn packed_memo(&self) -> &OnceLock<(Precision, Tensor)> {
        &self.storage.packed
    }

    /// True when both share one buffer.
    pub fn same_storage(&self, other: &Tensor) -> bool {
        Arc::ptr_eq(&self.storage, &other.storage)
    }
}

//! The data-parallel collectives over NCCL (through cudarc), for ranks that each drive a GPU:
//! the communicator is bootstrapped over MPI (rank 0 makes NCCL's unique id and broadcasts it),
//! then sums and gathers run on the GPUs and their links (NVLink, InfiniBand).
//!
//! The trainer's [`Collectives`] work on host buffers, so each call copies its data to the
//! rank's GPU, runs the NCCL collective on the context's default stream, and copies the result
//! back. NCCL chooses its own reduction order (ring or tree, by size and topology): its sums
//! are the same on every rank of a run, but not the bits of [`crate::mpi::Mpi`]'s rank-order
//! sums, so a run over NCCL matches one over MPI within rounding, not bit for bit.
//!
//! Loaded at run time like the rest of the CUDA device (`libnccl.so.2`); built with the
//! `cuda` feature and run where GPUs are (`scripts/device-check` on a multi-GPU machine).

use std::cell::Cell;
use std::sync::Arc;

use cudarc::driver::{CudaContext, CudaStream};
use cudarc::nccl::{Comm, Id, ReduceOp};

use crate::mpi::{chunk, Mpi, Traffic};
use crate::train::Collectives;

/// An NCCL communicator over the ranks of an MPI job, one GPU per rank.
pub struct Nccl {
    comm: Comm,
    stream: Arc<CudaStream>,
    rank: usize,
    size: usize,
    gpu: usize,
    traffic: Cell<Traffic>,
}

impl Nccl {
    /// Starts a communicator over `mpi`'s ranks: rank `r` drives GPU `r mod` (the GPUs this
    /// process sees), and rank 0's unique id reaches the others by `MPI_Bcast`.
    pub fn bootstrap(mpi: &Mpi) -> Result<Nccl, String> {
        // cudarc panics on a library it cannot load: look for them first.
        // SAFETY: each check only tries to open the library under its candidate names.
        if !unsafe { cudarc::driver::sys::is_culib_present() } {
            return Err(
                "the CUDA driver (libcuda) was not found: this machine has no GPU \
                        driver"
                    .to_string(),
            );
        }
        // SAFETY: as above.
        if !unsafe { cudarc::nccl::sys::is_culib_present() } {
            return Err(
                "NCCL (libnccl, from NVIDIA's `nvidia-nccl-cu13` wheel or the CUDA \
                        toolkit) was not found"
                    .to_string(),
            );
        }
        let gpus = CudaContext::device_count().map_err(|e| format!("counting GPUs: {e:?}"))?;
        if gpus < 1 {
            return Err("NCCL needs a GPU per rank, and this process sees none".to_string());
        }
        let (rank, size) = (mpi.rank(), mpi.size());
        let gpu = rank % gpus as usize;
        let ctx = CudaContext::new(gpu).map_err(|e| format!("opening GPU {gpu}: {e:?}"))?;
        let stream = ctx.default_stream();
        let mut id = [0u8; 128];
        if rank == 0 {
            let made = Id::new().map_err(|e| format!("making NCCL's unique id: {e:?}"))?;
            for (b, &c) in id.iter_mut().zip(made.internal()) {
                *b = c as u8;
            }
        }
        mpi.broadcast_bytes(&mut id, 0)
            .map_err(|e| format!("sharing NCCL's unique id: {e}"))?;
        let id = Id::uninit(id.map(|b| b as std::ffi::c_char));
        let comm = Comm::from_rank(Arc::clone(&stream), rank, size, id)
            .map_err(|e| format!("starting the NCCL communicator: {e:?}"))?;
        Ok(Nccl {
            comm,
            stream,
            rank,
            size,
            gpu,
            traffic: Cell::default(),
        })
    }

    /// The (visible) GPU this rank drives.
    pub fn gpu(&self) -> usize {
        self.gpu
    }

    fn count(&self, reduce: usize, gather: usize) {
        let mut t = self.traffic.get();
        t.reduce_bytes += reduce as u64;
        t.gather_bytes += gather as u64;
        self.traffic.set(t);
    }

    /// `data` summed over the ranks, on the GPUs.
    fn all_reduce<T>(&self, data: &[T]) -> Result<Vec<T>, String>
    where
        T: cudarc::driver::DeviceRepr + cudarc::nccl::NcclType + Copy,
    {
        let mut buf = self
            .stream
            .clone_htod(data)
            .map_err(|e| driver("copying to the GPU", e))?;
        self.comm
            .all_reduce_in_place(&mut buf, &ReduceOp::Sum)
            .map_err(|e| format!("ncclAllReduce: {e:?}"))?;
        self.stream
            .clone_dtoh(&buf)
            .map_err(|e| driver("copying from the GPU", e))
    }
}

fn driver(what: &str, e: cudarc::driver::DriverError) -> String {
    format!("{what}: {e:?}")
}

impl Collectives for Nccl {
    fn ranks(&self) -> usize {
        self.size
    }

    fn rank(&self) -> usize {
        self.rank
    }

    fn sum_f32(&self, data: &mut [f32]) -> Result<(), String> {
        let sum = self.all_reduce(data)?;
        data.copy_from_slice(&sum);
        let mine = chunk(data.len(), self.rank, self.size).len();
        self.count(4 * (data.len() - mine), 4 * mine * (self.size - 1));
        Ok(())
    }

    /// An all-reduce, of which this rank keeps its chunk: NCCL's reduce-scatter takes equal
    /// chunks, where [`chunk`]'s differ by one value.
    fn reduce_scatter_f32(&self, data: &[f32]) -> Result<Vec<f32>, String> {
        let sum = self.all_reduce(data)?;
        let mine = chunk(data.len(), self.rank, self.size);
        self.count(4 * (data.len() - mine.len()), 0);
        Ok(sum[mine].to_vec())
    }

    /// Every rank's chunk, padded to the longest for NCCL's all-gather, then unpadded.
    fn all_gather_f32(&self, mine: &[f32], data: &mut [f32]) -> Result<(), String> {
        let n = self.size;
        let width = (0..n)
            .map(|j| chunk(data.len(), j, n).len())
            .max()
            .unwrap_or(0);
        let mut padded = mine.to_vec();
        padded.resize(width, 0.0);
        let send = self
            .stream
            .clone_htod(&padded)
            .map_err(|e| driver("copying to the GPU", e))?;
        let mut recv = self
            .stream
            .alloc_zeros::<f32>(width * n)
            .map_err(|e| driver("allocating on the GPU", e))?;
        self.comm
            .all_gather(&send, &mut recv)
            .map_err(|e| format!("ncclAllGather: {e:?}"))?;
        let all = self
            .stream
            .clone_dtoh(&recv)
            .map_err(|e| driver("copying from the GPU", e))?;
        for j in 0..n {
            let c = chunk(data.len(), j, n);
            let len = c.len();
            data[c].copy_from_slice(&all[j * width..j * width + len]);
        }
        self.count(0, 4 * mine.len() * (n - 1));
        Ok(())
    }

    /// Bytes sent so far, as a ring sends them (NCCL does not report its own).
    fn traffic(&self) -> Traffic {
        self.traffic.get()
    }

    fn sum_f64(&self, data: &mut [f64]) -> Result<(), String> {
        let sum = self.all_reduce(data)?;
        data.copy_from_slice(&sum);
        let mut t = self.traffic.get();
        t.scalar_bytes += 8 * data.len() as u64;
        self.traffic.set(t);
        Ok(())
    }
}

//! The MPI transport (cargo feature `mpi`): rsmpi over the system's MPI
//! library (OpenMPI, MPICH, a vendor's). `mpirun -n 4 clip-wgpu train ...`
//! starts the ranks; the library carries the collectives over shared
//! memory, TCP or InfiniBand as it finds them.

use super::{Transport, World};
use anyhow::{bail, Result};
use mpi::datatype::PartitionMut;
use mpi::environment::Universe;
use mpi::topology::{Communicator, SimpleCommunicator};
use mpi::traits::*;
use mpi::Threading;

struct Mpi {
    // Dropped before the universe, whose drop is MPI_Finalize.
    comm: SimpleCommunicator,
    _universe: Universe,
}

impl Transport for Mpi {
    fn all_reduce_sum(&self, buf: &mut [f32]) {
        let send = buf.to_vec();
        self.comm
            .all_reduce_into(&send[..], buf, mpi::collective::SystemOperation::sum());
    }

    fn all_gather_bytes(&self, local: &[u8]) -> Vec<Vec<u8>> {
        let n = self.comm.size() as usize;
        let mut counts = vec![0i32; n];
        self.comm
            .all_gather_into(&(local.len() as i32), &mut counts[..]);
        let displs: Vec<i32> = counts
            .iter()
            .scan(0, |at, &c| {
                let d = *at;
                *at += c;
                Some(d)
            })
            .collect();
        let total = counts.iter().map(|&c| c as usize).sum();
        let mut all = vec![0u8; total];
        {
            let mut part = PartitionMut::new(&mut all[..], &counts[..], &displs[..]);
            self.comm.all_gather_varcount_into(local, &mut part);
        }
        counts
            .iter()
            .zip(&displs)
            .map(|(&c, &d)| all[d as usize..(d + c) as usize].to_vec())
            .collect()
    }

    fn barrier(&self) {
        self.comm.barrier();
    }

    fn abort(&self, code: i32) -> ! {
        self.comm.abort(code)
    }
}

/// Initialise MPI and return this process's world: rank, size and local
/// rank (its index among the ranks on this machine, from a shared-memory
/// split of the world). A program not started by mpirun is a world of one.
pub fn init() -> Result<World> {
    let Some((universe, _)) = mpi::initialize_with_threading(Threading::Funneled) else {
        bail!("MPI was already initialised in this process");
    };
    let comm = universe.world();
    let rank = comm.rank() as usize;
    let size = comm.size() as usize;
    let local_rank = comm.split_shared(rank as i32).rank() as usize;
    Ok(World::new(
        rank,
        size,
        local_rank,
        Box::new(Mpi {
            comm,
            _universe: universe,
        }),
    ))
}

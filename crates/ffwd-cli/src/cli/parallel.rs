//! Data-parallel runs under `mpirun` (cargo feature `mpi`): the MPI communicator as the
//! library's [`Collective`](ffwd::train::distributed::Collective), what only rank 0 does (progress, checkpoints, metrics), the end-of-run
//! check that every rank holds the same parameters, and `MPI_Abort` on any rank's error or
//! panic, so that a failing rank ends the job instead of leaving the others waiting.

use ffwd::core::ParamVisitor;
use ffwd::train::distributed;

/// True on rank 0 (and in a single process): the rank that prints and writes files.
pub(crate) fn primary() -> bool {
    distributed::rank_and_size().0 == 0
}

/// After a data-parallel run: checks that all ranks hold the same parameters and, on rank 0,
/// prints the communication totals. Nothing in a single process.
pub(crate) fn finish(steps: usize, train_seconds: f64, visit: &mut ParamVisitor<'_>) -> anyhow::Result<()> {
    let (rank, ranks) = distributed::rank_and_size();
    if ranks == 1 {
        return Ok(());
    }
    let hash = distributed::check_identical(visit)?;
    let s = distributed::sync_stats();
    // the slowest rank's view of the all-reduce share (its waits included)
    let mut share = [s.seconds, train_seconds];
    distributed::sum_f64(&mut share);
    if rank == 0 {
        eprintln!(
            "data parallel: {ranks} ranks, parameters identical on every rank (hash {hash:016x}) | all-reduce of {:.2} MB per step, {:.2} ms per step on average over the ranks, {:.1} % of the training time",
            s.bytes as f64 / 1e6,
            1e3 * share[0] / ranks as f64 / steps.max(1) as f64,
            100.0 * share[0] / share[1].max(1e-9),
        );
    }
    Ok(())
}

#[cfg(feature = "mpi")]
mod mpi_group {
    use mpi::collective::SystemOperation;
    use mpi::topology::{Communicator, SimpleCommunicator};
    use mpi::traits::*;

    /// The world communicator. MPI is initialised `Funneled`: only the main thread calls it
    /// (the trainers reduce between steps, never inside the rayon workers).
    pub(crate) struct MpiGroup(pub(crate) SimpleCommunicator);

    // SAFETY: the communicator is a handle that MPI lets any one thread use at a time; ffwd
    // calls it from the main thread only (Funneled), the trait's bounds notwithstanding.
    unsafe impl Send for MpiGroup {}
    unsafe impl Sync for MpiGroup {}

    impl ffwd::train::distributed::Collective for MpiGroup {
        fn rank(&self) -> usize {
            self.0.rank() as usize
        }

        fn size(&self) -> usize {
            self.0.size() as usize
        }

        fn all_reduce_sum(&self, send: &[f32], recv: &mut [f32]) {
            self.0.all_reduce_into(send, recv, SystemOperation::sum());
        }

        fn all_reduce_sum_f64(&self, send: &[f64], recv: &mut [f64]) {
            self.0.all_reduce_into(send, recv, SystemOperation::sum());
        }
    }
}

/// The MPI environment for the process's lifetime (finalised when dropped).
#[cfg(feature = "mpi")]
pub(crate) struct Mpi {
    _universe: mpi::environment::Universe,
}

/// Rank and size of the world, for messages and `MPI_Abort` from the panic hook.
#[cfg(feature = "mpi")]
static WORLD: std::sync::OnceLock<(usize, usize)> = std::sync::OnceLock::new();

/// Initialises MPI when the process was started by `mpirun` (and installs the group, the
/// abort-on-panic hook); `None` otherwise.
#[cfg(feature = "mpi")]
pub(crate) fn init() -> anyhow::Result<Option<Mpi>> {
    use mpi::topology::Communicator;
    let launched = ["OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK"].iter().any(|v| std::env::var_os(v).is_some());
    if !launched {
        return Ok(None);
    }
    let (universe, _level) = mpi::initialize_with_threading(mpi::Threading::Funneled).ok_or_else(|| anyhow::anyhow!("MPI could not be initialised"))?;
    let world = universe.world();
    let (rank, size) = (world.rank() as usize, world.size() as usize);
    let _ = WORLD.set((rank, size));
    ffwd::train::distributed::init(Box::new(mpi_group::MpiGroup(world)))?;
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        default_hook(info);
        abort(&format!("panic on rank {rank}"));
    }));
    Ok(Some(Mpi { _universe: universe }))
}

/// Ends the whole job (every rank) with exit code 1 after printing `msg`.
#[cfg(feature = "mpi")]
pub(crate) fn abort(msg: &str) -> ! {
    use mpi::topology::Communicator;
    eprintln!("error: {msg}");
    // a fresh handle to the world: the group's may be borrowed by the failing code
    let world = mpi::topology::SimpleCommunicator::world();
    world.abort(1)
}

/// Reports a failed run: on a multi-rank run, every rank is ended through `MPI_Abort`.
#[cfg(feature = "mpi")]
pub(crate) fn fail(e: &anyhow::Error) {
    if let Some(&(rank, size)) = WORLD.get() {
        if size > 1 {
            abort(&format!("rank {rank} of {size}: {e:#}"));
        }
    }
}

/// Threads per rank when `--threads` is not given: the cores shared among the ranks on this
/// host.
pub(crate) fn default_threads() -> usize {
    let local: usize = ["OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS"].iter().find_map(|v| std::env::var(v).ok()?.parse().ok()).unwrap_or(1);
    if local > 1 {
        (std::thread::available_parallelism().map_or(1, |n| n.get()) / local).max(1)
    } else {
        0
    }
}

//! World discovery: MPI when an MPI launcher (mpirun, mpiexec, srun with PMI/PMIx) started the
//! process and this build has MPI; otherwise a world of one. Returns three communicators over
//! the same ranks — the training loop's, the gradient reducer's (used from its communication
//! thread) and the optimizer's (`StepCtx::comm`) — so collectives of one never interleave with
//! another's.

use crate::error::{LaunchError, Result};
use dptrain_comm::LocalComm;
use dptrain_core::comm::{Communicator, WorldInfo};
use std::time::Duration;

pub struct World {
    pub main: Box<dyn Communicator>,
    /// Taken by the gradient reducer (multi-rank runs only).
    pub grads: Option<Box<dyn Communicator>>,
    /// The optimizer's collectives.
    pub optim: Box<dyn Communicator>,
    // Declared last: dropped after the communicators (dropping it finalises MPI).
    #[cfg(feature = "mpi")]
    _mpi: Option<dptrain_comm::mpi::MpiEnv>,
}

impl World {
    pub fn info(&self) -> &WorldInfo {
        self.main.world()
    }
}

pub fn discover(timeout: Duration) -> Result<World> {
    if dptrain_comm::world::under_mpi_launcher() {
        #[cfg(feature = "mpi")]
        {
            let env = dptrain_comm::mpi::MpiEnv::init().map_err(|e| LaunchError::Runtime(format!("MPI: {e}")))?;
            let main = Box::new(env.comm(timeout, "main"));
            let grads = Box::new(env.comm(timeout, "grads"));
            let optim = Box::new(env.comm(timeout, "optim"));
            return Ok(World { main, grads: Some(grads), optim, _mpi: Some(env) });
        }
        #[cfg(not(feature = "mpi"))]
        {
            let _ = timeout;
            if let Some((_, size, _)) = dptrain_comm::world::env_world() {
                if size > 1 {
                    return Err(LaunchError::Input(format!(
                        "started by an MPI launcher with {size} ranks, but this dptrain was built without MPI (cargo feature `mpi`)"
                    )));
                }
            }
        }
    }
    // Started as one of several ranks by something that is not an MPI launcher (plain srun
    // without --mpi, torchrun): running on as a world of one would train N unrelated copies.
    if let Some((rank, size, _)) = dptrain_comm::world::env_world() {
        if size > 1 {
            return Err(LaunchError::Input(format!(
                "this process is rank {rank} of {size} by its environment (Slurm/torchrun variables) but was not started by an MPI launcher; use `srun --mpi=pmix` or `mpirun`"
            )));
        }
    }
    Ok(World {
        main: Box::new(LocalComm::new()),
        grads: None,
        optim: Box::new(LocalComm::new()),
        #[cfg(feature = "mpi")]
        _mpi: None,
    })
}

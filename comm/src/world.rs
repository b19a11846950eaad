//! Who am I in the job? Rank, world size and local rank from the environment variables that
//! MPI launchers, Slurm and torchrun set — read before MPI is initialised (to decide whether to
//! initialise it at all) and to cross-check what MPI reports.

/// (rank, world size, local rank) from the environment, first match wins: Open MPI, MPICH/Intel
/// (PMI), Slurm, torchrun.
pub fn env_world() -> Option<(usize, usize, Option<usize>)> {
    let get = |k: &str| std::env::var(k).ok().and_then(|v| v.trim().parse::<usize>().ok());
    let sets: [(&str, &str, &[&str]); 4] = [
        ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", &["OMPI_COMM_WORLD_LOCAL_RANK"]),
        ("PMI_RANK", "PMI_SIZE", &["MPI_LOCALRANKID", "PMI_LOCAL_RANK"]),
        ("SLURM_PROCID", "SLURM_NTASKS", &["SLURM_LOCALID"]),
        ("RANK", "WORLD_SIZE", &["LOCAL_RANK"]),
    ];
    for (r, s, l) in sets {
        if let (Some(rank), Some(size)) = (get(r), get(s)) {
            return Some((rank, size, l.iter().find_map(|k| get(k))));
        }
    }
    None
}

/// True when an MPI launcher (mpirun/mpiexec, or srun with a PMI/PMIx plugin) started us.
pub fn under_mpi_launcher() -> bool {
    ["OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMI_RANK", "PMIX_RANK", "PMI_FD", "HYDI_CONTROL_FD"].iter().any(|k| std::env::var_os(k).is_some())
}

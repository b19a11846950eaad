//! `dptrain-comm`: implementations of `dptrain_core::comm::Communicator`. All MPI and NCCL code
//! will live here (architecture principle 11); today it holds the world of one that a plain
//! single-process run uses.

pub mod local;

pub use local::LocalComm;

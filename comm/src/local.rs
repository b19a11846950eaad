//! The world of one: every collective is the identity (all-reduce of one rank's buffer is that
//! buffer, for sum, average and max alike). Used when dptrain runs without an MPI launcher.

use dptrain_core::comm::{Communicator, ReduceOp, WorldInfo};
use dptrain_core::{Error, Result};

pub struct LocalComm {
    world: WorldInfo,
}

impl LocalComm {
    pub fn new() -> LocalComm {
        LocalComm { world: WorldInfo::single() }
    }
}

impl Default for LocalComm {
    fn default() -> Self {
        Self::new()
    }
}

impl Communicator for LocalComm {
    fn world(&self) -> &WorldInfo {
        &self.world
    }
    fn all_reduce(&mut self, _buf: &mut [f32], _op: ReduceOp) -> Result<()> {
        Ok(())
    }
    fn broadcast(&mut self, _buf: &mut [f32], root: usize) -> Result<()> {
        check_root(root)
    }
    fn broadcast_bytes(&mut self, _buf: &mut Vec<u8>, root: usize) -> Result<()> {
        check_root(root)
    }
    fn all_gather(&mut self, send: &[f32], recv: &mut [f32]) -> Result<()> {
        if recv.len() != send.len() {
            return Err(Error::Msg(format!("all_gather: receive buffer of {} for {} elements × 1 rank", recv.len(), send.len())));
        }
        recv.copy_from_slice(send);
        Ok(())
    }
    fn barrier(&mut self) -> Result<()> {
        Ok(())
    }
}

fn check_root(root: usize) -> Result<()> {
    if root != 0 {
        return Err(Error::Msg(format!("broadcast root {root} in a world of one")));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn world_of_one_collectives() {
        let mut c = LocalComm::new();
        assert_eq!((c.rank(), c.world_size()), (0, 1));
        let mut b = vec![1.0, 2.0];
        c.all_reduce(&mut b, ReduceOp::Avg).unwrap();
        assert_eq!(b, [1.0, 2.0]);
        let mut r = vec![0.0; 2];
        c.all_gather(&b, &mut r).unwrap();
        assert_eq!(r, b);
        assert!(c.all_gather(&b, &mut [0.0; 3]).is_err());
        assert!(c.broadcast(&mut b, 1).is_err());
    }
}

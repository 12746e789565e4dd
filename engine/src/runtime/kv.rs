//! Paged KV cache bookkeeping: a pool of fixed-size blocks, a block table per sequence, reference
//! counts so that forked sequences share their prefix, and copy-on-write when a shared block is
//! appended to.
//!
//! This module only decides *where* each token's keys and values go (a slot = block * block_size +
//! offset); the storage itself belongs to the backend ([`crate::backend::Backend::KvStore`]), which
//! holds, for every cached layer, one row of keys and one of values per slot. One block table serves
//! all layers.

use crate::error::{Error, Result};

/// Index of a block in the pool.
pub type BlockId = u32;

/// The pool of blocks shared by all sequences of a decoder.
#[derive(Debug)]
pub struct BlockPool {
    block_size: usize,
    refcount: Vec<u32>,
    free: Vec<BlockId>,
    /// The most blocks ever in use at once.
    peak_used: usize,
}

impl BlockPool {
    /// A pool of `num_blocks` blocks of `block_size` token slots each.
    pub fn new(num_blocks: usize, block_size: usize) -> Self {
        BlockPool {
            block_size,
            refcount: vec![0; num_blocks],
            free: (0..num_blocks as BlockId).rev().collect(),
            peak_used: 0,
        }
    }

    /// The most blocks that were ever in use at once (shared blocks count once).
    pub fn peak_used_blocks(&self) -> usize {
        self.peak_used
    }

    /// Token slots per block.
    pub fn block_size(&self) -> usize {
        self.block_size
    }

    /// Blocks in the pool.
    pub fn num_blocks(&self) -> usize {
        self.refcount.len()
    }

    /// Blocks not held by any sequence.
    pub fn free_blocks(&self) -> usize {
        self.free.len()
    }

    /// How many sequences hold `block`.
    pub fn refcount(&self, block: BlockId) -> u32 {
        self.refcount[block as usize]
    }

    fn allocate(&mut self) -> Result<BlockId> {
        let block = self.free.pop().ok_or_else(|| {
            Error::invalid(
                "KV cache",
                format!(
                    "all {} blocks of {} tokens are in use; release sequences or create the decoder with a larger cache",
                    self.num_blocks(),
                    self.block_size
                ),
            )
        })?;
        self.refcount[block as usize] = 1;
        self.peak_used = self.peak_used.max(self.num_blocks() - self.free.len());
        Ok(block)
    }

    fn retain(&mut self, block: BlockId) {
        self.refcount[block as usize] += 1;
    }

    fn release(&mut self, block: BlockId) {
        let count = &mut self.refcount[block as usize];
        debug_assert!(*count > 0, "releasing a free block");
        *count -= 1;
        if *count == 0 {
            self.free.push(block);
        }
    }
}

/// Where one sequence's tokens live: `blocks[i]` holds positions `i * block_size ..`.
#[derive(Clone, Debug, Default)]
pub struct BlockTable {
    blocks: Vec<BlockId>,
    len: usize,
}

/// A copy the backend must make before new tokens are written: block `from` to block `to`, every layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockCopy {
    pub from: BlockId,
    pub to: BlockId,
}

impl BlockTable {
    /// Tokens stored.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when no token is stored.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The blocks, in position order.
    pub fn blocks(&self) -> &[BlockId] {
        &self.blocks
    }

    /// Free blocks that [`BlockTable::reserve`] of `n` more tokens would take: the new blocks, and
    /// a copy of the partly filled last block if it is shared.
    pub fn blocks_needed(&self, pool: &BlockPool, n: usize) -> usize {
        if n == 0 {
            return 0;
        }
        let bs = pool.block_size;
        let new = (self.len + n).div_ceil(bs).saturating_sub(self.blocks.len());
        let copy = match self.blocks.get(self.len / bs) {
            Some(&last) if !self.len.is_multiple_of(bs) && pool.refcount(last) > 1 => 1,
            _ => 0,
        };
        new + copy
    }

    /// Makes room for `n` more tokens and returns their slots. A shared last block is first copied
    /// (the copy to make is pushed on `copies`). On error (pool exhausted) nothing has changed.
    pub fn reserve(&mut self, pool: &mut BlockPool, n: usize, copies: &mut Vec<BlockCopy>) -> Result<Vec<usize>> {
        let bs = pool.block_size;
        let before = (self.blocks.clone(), copies.len());
        let mut fresh: Vec<BlockId> = Vec::new();
        let mut replaced: Vec<BlockId> = Vec::new();
        let result = (|| {
            let mut slots = Vec::with_capacity(n);
            for position in self.len..self.len + n {
                let index = position / bs;
                if index == self.blocks.len() {
                    let block = pool.allocate()?;
                    fresh.push(block);
                    self.blocks.push(block);
                } else {
                    // Writing into a block we already hold (the partly filled last one): it must be
                    // ours alone. After one copy it is, so this copies at most once per call.
                    let block = self.blocks[index];
                    if pool.refcount(block) > 1 {
                        let copy = pool.allocate()?;
                        fresh.push(copy);
                        replaced.push(block);
                        copies.push(BlockCopy { from: block, to: copy });
                        self.blocks[index] = copy;
                    }
                }
                slots.push(self.blocks[index] as usize * bs + position % bs);
            }
            Ok(slots)
        })();
        match result {
            Ok(slots) => {
                for block in replaced {
                    pool.release(block);
                }
                self.len += n;
                Ok(slots)
            }
            Err(e) => {
                for block in fresh {
                    pool.release(block);
                }
                self.blocks = before.0;
                copies.truncate(before.1);
                Err(e)
            }
        }
    }

    /// Forgets every token from position `len` on, returning blocks no longer needed.
    pub fn truncate(&mut self, pool: &mut BlockPool, len: usize) {
        if len >= self.len {
            return;
        }
        let keep = len.div_ceil(pool.block_size);
        for block in self.blocks.drain(keep..) {
            pool.release(block);
        }
        self.len = len;
    }

    /// A second table over the same blocks (each gains a reference).
    pub fn fork(&self, pool: &mut BlockPool) -> BlockTable {
        for &block in &self.blocks {
            pool.retain(block);
        }
        self.clone()
    }

    /// Gives the blocks back to the pool.
    pub fn release(&mut self, pool: &mut BlockPool) {
        for block in self.blocks.drain(..) {
            pool.release(block);
        }
        self.len = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_fill_blocks_in_order() {
        let mut pool = BlockPool::new(4, 4);
        let mut table = BlockTable::default();
        let mut copies = Vec::new();
        let slots = table.reserve(&mut pool, 6, &mut copies).expect("room");
        let (b0, b1) = (table.blocks()[0] as usize, table.blocks()[1] as usize);
        assert_eq!(slots, vec![b0 * 4, b0 * 4 + 1, b0 * 4 + 2, b0 * 4 + 3, b1 * 4, b1 * 4 + 1]);
        assert_eq!(pool.free_blocks(), 2);
        assert!(copies.is_empty());
    }

    #[test]
    fn forks_share_until_one_appends_into_the_shared_block() {
        let mut pool = BlockPool::new(8, 4);
        let mut copies = Vec::new();
        let mut a = BlockTable::default();
        a.reserve(&mut pool, 6, &mut copies).expect("room");
        let mut b = a.fork(&mut pool);
        assert_eq!(a.blocks(), b.blocks());
        assert_eq!(pool.free_blocks(), 6);
        assert!(a.blocks().iter().all(|&blk| pool.refcount(blk) == 2));

        // b appends into the half-full second block: that block is copied, the first stays shared.
        let slot = b.reserve(&mut pool, 1, &mut copies).expect("room");
        assert_eq!(copies, vec![BlockCopy { from: a.blocks()[1], to: b.blocks()[1] }]);
        assert_eq!(slot, vec![b.blocks()[1] as usize * 4 + 2]);
        assert_eq!(a.blocks()[0], b.blocks()[0]);
        assert_ne!(a.blocks()[1], b.blocks()[1]);
        assert_eq!(pool.refcount(a.blocks()[1]), 1);
        assert_eq!(pool.refcount(a.blocks()[0]), 2);

        // a now owns its second block alone: no copy.
        copies.clear();
        a.reserve(&mut pool, 1, &mut copies).expect("room");
        assert!(copies.is_empty());

        a.release(&mut pool);
        b.release(&mut pool);
        assert_eq!(pool.free_blocks(), 8);
    }

    #[test]
    fn a_fork_at_a_block_boundary_copies_nothing() {
        let mut pool = BlockPool::new(8, 4);
        let mut copies = Vec::new();
        let mut a = BlockTable::default();
        a.reserve(&mut pool, 4, &mut copies).expect("room");
        let mut b = a.fork(&mut pool);
        b.reserve(&mut pool, 2, &mut copies).expect("room");
        assert!(copies.is_empty(), "the full shared block is never written");
        assert_eq!(b.blocks()[0], a.blocks()[0]);
    }

    #[test]
    fn exhaustion_is_an_error_that_changes_nothing() {
        let mut pool = BlockPool::new(2, 4);
        let mut copies = Vec::new();
        let mut a = BlockTable::default();
        a.reserve(&mut pool, 6, &mut copies).expect("room");
        let mut b = a.fork(&mut pool);
        let err = b.reserve(&mut pool, 3, &mut copies).expect_err("pool is full");
        assert!(err.to_string().contains("KV cache"), "{err}");
        assert_eq!(b.len(), 6);
        assert_eq!(b.blocks(), a.blocks());
        assert!(copies.is_empty());
        assert_eq!(pool.free_blocks(), 0);
        assert!(a.blocks().iter().all(|&blk| pool.refcount(blk) == 2));
        let mut c = BlockTable::default();
        assert!(c.reserve(&mut pool, 1, &mut copies).is_err());
        assert!(c.is_empty());
    }
}

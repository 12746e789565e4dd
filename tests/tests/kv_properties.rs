//! Property tests of the paged KV cache's bookkeeping (issue #13): any sequence of starts, appends,
//! forks, truncations and releases keeps the blocks a reservation takes equal to what
//! `blocks_needed` predicted, every block's reference count equal to the number of
//! tables holding it, the free list equal to the blocks nobody holds, and every sequence's tokens
//! readable through its table, copy-on-write copies applied as the backend applies them.

use layerwise::runtime::kv::{BlockCopy, BlockPool, BlockTable};
use proptest::prelude::*;

#[derive(Clone, Debug)]
enum Op {
    Start,
    Append { seq: usize, n: usize },
    Fork { seq: usize },
    Truncate { seq: usize, len: usize },
    Release { seq: usize },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        1 => Just(Op::Start),
        4 => (0..8usize, 1..12usize).prop_map(|(seq, n)| Op::Append { seq, n }),
        2 => (0..8usize).prop_map(|seq| Op::Fork { seq }),
        1 => (0..8usize, 0..40usize).prop_map(|(seq, len)| Op::Truncate { seq, len }),
        1 => (0..8usize).prop_map(|seq| Op::Release { seq }),
    ]
}

/// A sequence: its table and the tokens it should read back (the model).
struct Seq {
    table: BlockTable,
    tokens: Vec<u64>,
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn kv_cache_bookkeeping_holds_under_any_operations(
        block_size in 1..6usize,
        num_blocks in 1..24usize,
        ops in prop::collection::vec(op(), 1..80),
    ) {
        let mut pool = BlockPool::new(num_blocks, block_size);
        // What the backend's store holds: a value per slot.
        let mut store = vec![u64::MAX; num_blocks * block_size];
        let mut seqs: Vec<Seq> = Vec::new();
        let mut next_value = 0u64;
        for op in ops {
            match op {
                Op::Start => seqs.push(Seq { table: BlockTable::default(), tokens: Vec::new() }),
                Op::Append { seq, n } if seq < seqs.len() => {
                    let s = &mut seqs[seq];
                    let blocks_before = s.table.blocks().to_vec();
                    let free_before = pool.free_blocks();
                    // What a scheduler plans with: exactly the free blocks the reservation takes.
                    let needed = s.table.blocks_needed(&pool, n);
                    let mut copies: Vec<BlockCopy> = Vec::new();
                    match s.table.reserve(&mut pool, n, &mut copies) {
                        Ok(slots) => {
                            prop_assert_eq!(free_before - pool.free_blocks(), needed);
                            prop_assert_eq!(slots.len(), n);
                            for copy in &copies {
                                let (from, to) = (copy.from as usize * block_size, copy.to as usize * block_size);
                                store.copy_within(from..from + block_size, to);
                            }
                            for slot in slots {
                                store[slot] = next_value;
                                s.tokens.push(next_value);
                                next_value += 1;
                            }
                        }
                        Err(_) => {
                            prop_assert!(needed > free_before);
                            // Nothing changed.
                            prop_assert_eq!(s.table.blocks(), blocks_before.as_slice());
                            prop_assert_eq!(pool.free_blocks(), free_before);
                            prop_assert!(copies.is_empty());
                        }
                    }
                }
                Op::Fork { seq } if seq < seqs.len() => {
                    let table = seqs[seq].table.fork(&mut pool);
                    let tokens = seqs[seq].tokens.clone();
                    seqs.push(Seq { table, tokens });
                }
                Op::Truncate { seq, len } if seq < seqs.len() => {
                    let s = &mut seqs[seq];
                    s.table.truncate(&mut pool, len);
                    s.tokens.truncate(len);
                }
                Op::Release { seq } if seq < seqs.len() => {
                    let mut s = seqs.swap_remove(seq);
                    s.table.release(&mut pool);
                }
                _ => {}
            }

            // Reference counts are the number of tables holding each block; the free list is
            // exactly the blocks nobody holds.
            let mut held = vec![0u32; num_blocks];
            for s in &seqs {
                prop_assert_eq!(s.table.len(), s.tokens.len());
                prop_assert_eq!(s.table.blocks().len(), s.tokens.len().div_ceil(block_size));
                for &b in s.table.blocks() {
                    held[b as usize] += 1;
                }
            }
            for (block, &count) in held.iter().enumerate() {
                prop_assert_eq!(pool.refcount(block as u32), count, "block {}", block);
            }
            prop_assert_eq!(pool.free_blocks(), held.iter().filter(|&&c| c == 0).count());
            // Every sequence reads back its own tokens.
            for s in &seqs {
                for (position, &want) in s.tokens.iter().enumerate() {
                    let slot = s.table.blocks()[position / block_size] as usize * block_size + position % block_size;
                    prop_assert_eq!(store[slot], want, "position {}", position);
                }
            }
        }
    }
}

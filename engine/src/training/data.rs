//! Training data: documents tokenized and concatenated (each followed by the end-of-text token when
//! the model has one), cut into blocks of the training length as upstream's `group_texts` cuts them
//! (the remainder dropped, unless the whole text is shorter than one block), and served in batches
//! in an order drawn from the seed and the epoch, so that a resumed run sees the same batches.

use crate::error::{Error, Result};
use crate::io::tokenizer::Tokenizer;

use super::network::Batch;
use super::params::Normal;

/// Token blocks of one length.
#[derive(Clone, Debug)]
pub struct Blocks {
    pub tokens: Vec<u32>,
    pub block: usize,
}

impl Blocks {
    /// Tokenizes `documents` and cuts the stream into blocks of `block` tokens; `what` names the
    /// data in errors.
    pub fn from_documents(
        documents: &[String],
        tokenizer: &Tokenizer,
        separator: Option<u32>,
        block: usize,
        what: &str,
    ) -> Result<Blocks> {
        let mut stream = Vec::new();
        for doc in documents {
            stream.extend(tokenizer.encode(doc)?);
            stream.extend(separator);
        }
        Blocks::from_tokens(stream, block, what)
    }

    /// Cuts `stream` into blocks of `block` tokens.
    pub fn from_tokens(mut stream: Vec<u32>, block: usize, what: &str) -> Result<Blocks> {
        if block < 2 {
            return Err(Error::invalid(
                "--block-size",
                format!("{block} is too short: a block needs at least 2 tokens"),
            ));
        }
        if stream.len() < 2 {
            return Err(Error::invalid(what, format!("{} tokens: nothing to train on", stream.len())));
        }
        let block = if stream.len() < block { stream.len() } else { block };
        stream.truncate(stream.len() / block * block);
        Ok(Blocks { tokens: stream, block })
    }

    pub fn len(&self) -> usize {
        self.tokens.len() / self.block
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Batches of one epoch: `ceil(len / batch)`, the last one smaller.
    pub fn batches_per_epoch(&self, batch: usize) -> usize {
        self.len().div_ceil(batch.max(1))
    }

    /// Batch `index` of `epoch`, in the epoch's shuffled order (Fisher–Yates on a stream seeded
    /// by `seed` and `epoch`).
    pub fn batch(&self, seed: u64, epoch: usize, index: usize, batch: usize) -> Batch {
        let order = self.order(seed, epoch);
        let picked = &order[(index * batch).min(order.len())..((index + 1) * batch).min(order.len())];
        let tokens =
            picked.iter().flat_map(|&b| self.tokens[b * self.block..(b + 1) * self.block].iter().copied()).collect();
        Batch { tokens, batch: picked.len(), time: self.block }
    }

    /// Every block once, in order, in batches: for evaluation.
    pub fn in_order(&self, batch: usize) -> impl Iterator<Item = Batch> + '_ {
        (0..self.batches_per_epoch(batch)).map(move |i| {
            let (start, end) = (i * batch, ((i + 1) * batch).min(self.len()));
            Batch {
                tokens: self.tokens[start * self.block..end * self.block].to_vec(),
                batch: end - start,
                time: self.block,
            }
        })
    }

    fn order(&self, seed: u64, epoch: usize) -> Vec<usize> {
        let mut order: Vec<usize> = (0..self.len()).collect();
        let mut rng = Normal::new(seed ^ (epoch as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
        for i in (1..order.len()).rev() {
            order.swap(i, rng.below(i + 1));
        }
        order
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_drop_the_remainder_and_batches_cover_an_epoch_once() {
        let blocks = Blocks::from_tokens((0..23).collect(), 4, "data").expect("blocks");
        assert_eq!(blocks.len(), 5);
        assert_eq!(blocks.batches_per_epoch(2), 3);
        let mut seen: Vec<u32> = (0..3).flat_map(|i| blocks.batch(7, 0, i, 2).tokens).collect();
        assert_eq!(blocks.batch(7, 0, 2, 2).batch, 1);
        seen.sort();
        assert_eq!(seen, (0..20).collect::<Vec<_>>());
        // The same seed and epoch give the same order; another epoch another.
        assert_eq!(blocks.batch(7, 0, 0, 2).tokens, blocks.batch(7, 0, 0, 2).tokens);
        let epochs: Vec<Vec<u32>> = (0..4).map(|e| blocks.batch(7, e, 0, 5).tokens).collect();
        assert!(epochs.iter().any(|e| e != &epochs[0]));
    }

    #[test]
    fn short_text_is_one_block_and_empty_text_an_error() {
        let one = Blocks::from_tokens(vec![1, 2, 3], 8, "data").expect("one block");
        assert_eq!((one.len(), one.block), (1, 3));
        let err = Blocks::from_tokens(vec![1], 8, "--data x").expect_err("too short").to_string();
        assert!(err.contains("--data x") && err.contains("nothing to train on"), "{err}");
    }
}

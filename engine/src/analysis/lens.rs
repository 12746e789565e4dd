//! The logit lens (nostalgebraist 2020): every layer's residual state at every position, projected
//! to the vocabulary, with what each projection predicts and how far it is from the model's output.
//!
//! Decoders: the model's final norm + LM head (the classic lens), the checkpoint's exit heads
//! (multi-exit lens), its conversion matrices, or blocks / sub-layers of the top of the model run
//! on the state before the final norm and head (transformer-utils' `decoder_layer_names`, e.g.
//! `h.11.mlp` for GPT-Neo).
//!
//! ```
//! use layerwise::analysis::lens::{logit_lens, LensDecoder, LensOptions};
//!
//! let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures/gpt2-sharded");
//! let model = layerwise::load(dir)?.model;
//! let lens = logit_lens(&model, &[5, 17, 42, 7], &LensOptions { top_k: 3, ..Default::default() })?;
//! assert_eq!(lens.rows, ["embed", "h.0", "h.1", "h.2", "h.3"]);
//! // The last row is the model's own output: no divergence from it.
//! assert!(lens.kl_to_final[4].iter().all(|kl| kl.abs() < 1e-5));
//! // Decoding through the exit heads gives one row per exit.
//! let exits = logit_lens(&model, &[5, 17, 42, 7], &LensOptions { decoder: LensDecoder::Exits, ..Default::default() })?;
//! assert_eq!(exits.rows, ["h.0", "h.1", "h.3"]);
//! # Ok::<(), layerwise::Error>(())
//! ```

use rayon::prelude::*;
use serde::Serialize;

use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::exits::{Projection, Source};
use crate::math::{argmax, log_normaliser};
use crate::model::{BlockPart, InspectRequest, Model, Point, Site};

/// How a residual state becomes a distribution over the vocabulary.
#[derive(Clone, Debug, Default, PartialEq)]
pub enum LensDecoder {
    /// The final norm and the LM head.
    #[default]
    Final,
    /// The final norm and the checkpoint's exit head of each layer that has one (rows: those layers).
    Exits,
    /// The final norm, the checkpoint's conversion matrix to the top layer, the LM head (rows: layers
    /// with a conversion, and the top).
    Converted,
    /// These `(block, part)` run on the state first (a fresh pass over the prompt's positions), then
    /// the final norm and the LM head.
    Through(Vec<(usize, BlockPart)>),
}

impl LensDecoder {
    /// `final`, `exits`, `converted`, or a comma-separated list of blocks / sub-layers in the
    /// checkpoint's names (`h.11`, `h.11.attn`, `h.11.mlp`) to run before the final norm and head.
    pub fn parse<B: Backend>(model: &Model<B>, text: &str) -> Result<Self> {
        match text {
            "final" => return Ok(LensDecoder::Final),
            "exits" => return Ok(LensDecoder::Exits),
            "converted" => return Ok(LensDecoder::Converted),
            _ => {}
        }
        let part = |name: &str| -> Result<(usize, BlockPart)> {
            match model.point(name.trim()) {
                Ok(Point::Block { block, site: Site::Output }) => Ok((block, BlockPart::Whole)),
                Ok(Point::Block { block, site: Site::Attention }) => Ok((block, BlockPart::Attention)),
                Ok(Point::Block { block, site: Site::Mlp }) => Ok((block, BlockPart::Mlp)),
                _ => Err(Error::invalid(
                    "decoder",
                    format!(
                        "`{name}` is not a block or sub-layer; use final, exits, converted, or names like {0}.N, \
                         {0}.N.{1}, {0}.N.{2}",
                        model.module_names().blocks,
                        model.module_names().attention,
                        model.module_names().mlp
                    ),
                )),
            }
        };
        Ok(LensDecoder::Through(text.split(',').map(part).collect::<Result<_>>()?))
    }
}

/// What [`Model::logit_lens`] computes.
#[derive(Clone, Debug)]
pub struct LensOptions {
    pub decoder: LensDecoder,
    /// Also the residual stream after each block's attention sub-layer (rows `h.i.attn`, `h.i.mlp`).
    pub subblocks: bool,
    /// Tokens listed per cell.
    pub top_k: usize,
}

impl Default for LensOptions {
    fn default() -> Self {
        LensOptions { decoder: LensDecoder::Final, subblocks: false, top_k: 5 }
    }
}

/// The lens over a prompt: one row per projected state (bottom layer first), one column per position.
/// Probabilities are the softmax of each row's logits; logarithms are natural.
#[derive(Clone, Debug, Serialize)]
pub struct Lens {
    /// Row labels: `embed`, `h.0`, ... (with sub-blocks `h.0.attn`, `h.0.mlp`, ...).
    pub rows: Vec<String>,
    /// The input ids (columns).
    pub tokens: Vec<u32>,
    /// `[rows][positions][k]`: the row's top tokens and their probabilities.
    pub top_ids: Vec<Vec<Vec<u32>>>,
    pub top_probs: Vec<Vec<Vec<f32>>>,
    /// `[rows][positions]`: the logit of the row's top token.
    pub top_logit: Vec<Vec<f32>>,
    /// `[rows][positions]`: entropy of the row's distribution.
    pub entropy: Vec<Vec<f32>>,
    /// `[rows][positions]`: KL(final ‖ row), the final distribution being the model's own output.
    pub kl_to_final: Vec<Vec<f32>>,
    /// `[positions]`: the model's own top token at each position.
    pub final_top: Vec<u32>,
    /// `[rows][positions]`: the logit, probability and rank (1 = top) the row gives the model's own
    /// top token (what transformer-utils' plot colours by).
    pub final_top_logit: Vec<Vec<f32>>,
    pub final_top_prob: Vec<Vec<f32>>,
    pub final_top_rank: Vec<Vec<u32>>,
    /// `[rows][positions - 1]`: probability and rank of the actual next input token (the input
    /// continues at every position but the last).
    pub next_prob: Vec<Vec<f32>>,
    pub next_rank: Vec<Vec<u32>>,
}

/// What one row says at one position.
struct Cell {
    top_ids: Vec<u32>,
    top_probs: Vec<f32>,
    top_logit: f32,
    entropy: f32,
    kl_to_final: f32,
    final_top: (f32, f32, u32),
    next: Option<(f32, u32)>,
}

/// The logit lens of `ids` under `options`. The states stay on the backend; each row's logits come
/// back once, for the statistics.
pub fn logit_lens<B: Backend>(model: &Model<B>, ids: &[u32], options: &LensOptions) -> Result<Lens> {
    let spec = model.spec();
    let n = spec.num_layers;
    if options.top_k == 0 || options.top_k > spec.vocab_size {
        return Err(Error::invalid("top_k", format!("must be between 1 and the vocabulary size {}", spec.vocab_size)));
    }
    // Which states to project: (label, point, layer for exit/converted heads).
    let block_name = |block: usize| model.point_name(Point::Block { block, site: Site::Output });
    let mut rows: Vec<(String, Point, usize)> = Vec::new();
    match &options.decoder {
        LensDecoder::Final | LensDecoder::Through(_) => {
            rows.push(("embed".into(), Point::Embeddings, 0));
            for block in 0..n {
                if options.subblocks {
                    let (attn, mlp) = (model.module_names().attention, model.module_names().mlp);
                    rows.push((
                        format!("{}.{attn}", block_name(block)),
                        Point::Block { block, site: Site::ResidMid },
                        0,
                    ));
                    rows.push((format!("{}.{mlp}", block_name(block)), Point::Block { block, site: Site::Output }, 0));
                } else {
                    rows.push((block_name(block), Point::Block { block, site: Site::Output }, 0));
                }
            }
        }
        LensDecoder::Exits | LensDecoder::Converted => {
            if options.subblocks {
                return Err(Error::invalid(
                    "subblocks",
                    "sub-block states have no exit heads or conversions; use the final decoder or a list of blocks",
                ));
            }
            let layers: Vec<usize> = if options.decoder == LensDecoder::Exits {
                spec.exit_layers.clone()
            } else {
                model.conversion_layers().into_iter().chain([n]).collect()
            };
            if layers.is_empty() {
                return Err(Error::invalid("decoder", "the checkpoint has no exit heads"));
            }
            for layer in layers {
                rows.push((block_name(layer - 1), Point::Block { block: layer - 1, site: Site::Output }, layer));
            }
        }
    }

    let request = InspectRequest { points: rows.iter().map(|r| r.1).collect(), logits: true, ..Default::default() };
    let seen = model.inspect_on_backend(ids, &request)?;
    let b = model.backend();
    let t = ids.len();
    let vocab = spec.vocab_size;
    let final_logits = b.to_host(seen.logits.as_ref().ok_or_else(|| Error::invalid("lens", "no logits"))?)?;
    let final_log_probs: Vec<Vec<f64>> = final_logits.chunks_exact(vocab).map(log_softmax).collect();
    let final_top: Vec<u32> = final_logits.chunks_exact(vocab).map(argmax).collect();

    let mut lens = Lens {
        rows: Vec::new(),
        tokens: ids.to_vec(),
        top_ids: Vec::new(),
        top_probs: Vec::new(),
        top_logit: Vec::new(),
        entropy: Vec::new(),
        kl_to_final: Vec::new(),
        final_top: final_top.clone(),
        final_top_logit: Vec::new(),
        final_top_prob: Vec::new(),
        final_top_rank: Vec::new(),
        next_prob: Vec::new(),
        next_rank: Vec::new(),
    };
    for (label, point, layer) in rows {
        let state = &seen.activations[&point];
        let logits = match &options.decoder {
            LensDecoder::Final => model.project(Source::Original, Projection::ExitHeads, state)?,
            LensDecoder::Through(parts) => {
                model.project(Source::Original, Projection::ExitHeads, &model.run_parts(b.copy(state)?, parts)?)?
            }
            LensDecoder::Exits => model.project(Source::Layer(layer), Projection::ExitHeads, state)?,
            LensDecoder::Converted => model.project(Source::Layer(layer), Projection::Converted, state)?,
        };
        let logits = b.to_host(&logits)?;
        let cells: Vec<Cell> = (0..t)
            .into_par_iter()
            .map(|pos| {
                let next = ids.get(pos + 1).copied();
                cell(
                    &logits[pos * vocab..(pos + 1) * vocab],
                    &final_log_probs[pos],
                    final_top[pos],
                    next,
                    options.top_k,
                )
            })
            .collect();
        lens.rows.push(label);
        lens.top_ids.push(cells.iter().map(|c| c.top_ids.clone()).collect());
        lens.top_probs.push(cells.iter().map(|c| c.top_probs.clone()).collect());
        lens.top_logit.push(cells.iter().map(|c| c.top_logit).collect());
        lens.entropy.push(cells.iter().map(|c| c.entropy).collect());
        lens.kl_to_final.push(cells.iter().map(|c| c.kl_to_final).collect());
        lens.final_top_logit.push(cells.iter().map(|c| c.final_top.0).collect());
        lens.final_top_prob.push(cells.iter().map(|c| c.final_top.1).collect());
        lens.final_top_rank.push(cells.iter().map(|c| c.final_top.2).collect());
        lens.next_prob.push(cells.iter().filter_map(|c| c.next.map(|n| n.0)).collect());
        lens.next_rank.push(cells.iter().filter_map(|c| c.next.map(|n| n.1)).collect());
    }
    Ok(lens)
}

/// The statistics of one row's logits at one position.
fn cell(logits: &[f32], final_log_probs: &[f64], final_top: u32, next: Option<u32>, k: usize) -> Cell {
    let log_probs = log_softmax(logits);
    let mut entropy = 0.0f64;
    let mut kl = 0.0f64;
    for (&lp, &lf) in log_probs.iter().zip(final_log_probs) {
        entropy -= lp.exp() * lp;
        kl += lf.exp() * (lf - lp);
    }
    // transformer-utils' rank: how many tokens score at least as high (1 = top).
    let rank = |id: u32| logits.iter().filter(|&&x| x >= logits[id as usize]).count() as u32;
    let mut order: Vec<u32> = (0..logits.len() as u32).collect();
    let by_logit = |a: &u32, b: &u32| logits[*b as usize].total_cmp(&logits[*a as usize]).then(a.cmp(b));
    order.select_nth_unstable_by(k - 1, by_logit);
    order.truncate(k);
    order.sort_unstable_by(by_logit);
    let f = final_top as usize;
    Cell {
        top_probs: order.iter().map(|&i| log_probs[i as usize].exp() as f32).collect(),
        top_logit: logits[order[0] as usize],
        top_ids: order,
        entropy: entropy as f32,
        kl_to_final: kl as f32,
        final_top: (logits[f], log_probs[f].exp() as f32, rank(final_top)),
        next: next.map(|id| (log_probs[id as usize].exp() as f32, rank(id))),
    }
}

/// Natural-log softmax in f64.
fn log_softmax(logits: &[f32]) -> Vec<f64> {
    let log_z = log_normaliser(logits);
    logits.iter().map(|&x| x as f64 - log_z).collect()
}

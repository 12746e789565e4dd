//! What an evaluation scores: one exit plan, or many heads over one forward pass (`--all-plans`:
//! the original head, every exit head and chosen contrasts all read the same hidden states, so each
//! window runs the model once for all of them).

use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::exits::PlanOptions;
use crate::math;
use crate::model::{ForwardRequest, Model};

/// One row of a many-head evaluation.
#[derive(Clone, Debug, PartialEq)]
pub enum Scorer {
    /// The LM head.
    Original,
    /// The exit head of a layer.
    Exit(usize),
    /// ACD of an upper head (an exit, or the original head when `None`) against a lower exit head:
    /// upstream's formula on the two heads' logits.
    Contrast { upper: Option<usize>, lower: usize, alpha: f32, min_candidates: usize },
}

impl Scorer {
    /// The row's name: `original`, `exit 2`, `acd original-2`.
    pub fn name(&self) -> String {
        match self {
            Scorer::Original => "original".into(),
            Scorer::Exit(l) => format!("exit {l}"),
            Scorer::Contrast { upper, lower, .. } => {
                format!("acd {}-{lower}", upper.map_or("original".to_string(), |u| u.to_string()))
            }
        }
    }

    /// The original head, every exit of the model, and `contrasts` (upper, lower) at `alpha`.
    pub fn all(
        exits: &[usize],
        contrasts: &[(Option<usize>, usize)],
        alpha: f32,
        min_candidates: usize,
    ) -> Vec<Scorer> {
        std::iter::once(Scorer::Original)
            .chain(exits.iter().map(|&l| Scorer::Exit(l)))
            .chain(contrasts.iter().map(|&(upper, lower)| Scorer::Contrast { upper, lower, alpha, min_candidates }))
            .collect()
    }
}

/// What to score: an exit plan (the original head when `None`) or many heads at once.
#[derive(Clone, Copy, Debug)]
pub enum Heads<'a> {
    Plan(Option<&'a PlanOptions>),
    Many(&'a [Scorer]),
}

impl Heads<'_> {
    /// How many score matrices each forward pass yields.
    pub fn count(&self) -> usize {
        match self {
            Heads::Plan(_) => 1,
            Heads::Many(scorers) => scorers.len(),
        }
    }

    /// One forward pass over `ids`: `[ids.len(), vocab]` scores per head (logits, or
    /// log-probabilities for a contrast).
    pub fn scores<B: Backend>(&self, model: &Model<B>, ids: &[u32]) -> Result<Vec<Vec<f32>>> {
        let missing = || Error::invalid("evaluation", "the forward pass returned no scores");
        match self {
            Heads::Plan(Some(plan)) => {
                let out = model.forward(ids, &ForwardRequest { plan: Some((*plan).clone()), ..Default::default() })?;
                Ok(vec![out.plan.ok_or_else(missing)?])
            }
            Heads::Plan(None) => {
                let out = model.forward(ids, &ForwardRequest { logits: true, ..Default::default() })?;
                Ok(vec![out.logits.ok_or_else(missing)?])
            }
            Heads::Many(scorers) => {
                let mut exits: Vec<usize> = scorers
                    .iter()
                    .flat_map(|s| match s {
                        Scorer::Original => vec![],
                        Scorer::Exit(l) => vec![*l],
                        Scorer::Contrast { upper, lower, .. } => upper.iter().copied().chain([*lower]).collect(),
                    })
                    .collect();
                exits.sort_unstable();
                exits.dedup();
                let out = model.forward(ids, &ForwardRequest { logits: true, exits, ..Default::default() })?;
                let logits = out.logits.as_ref().ok_or_else(missing)?;
                let vocab = model.spec().vocab_size;
                let head = |layer: Option<usize>| -> Result<&Vec<f32>> {
                    match layer {
                        None => Ok(logits),
                        Some(l) => out.exits.get(&l).ok_or_else(missing),
                    }
                };
                scorers
                    .iter()
                    .map(|s| match s {
                        Scorer::Original => Ok(logits.clone()),
                        Scorer::Exit(l) => Ok(head(Some(*l))?.clone()),
                        Scorer::Contrast { upper, lower, alpha, min_candidates } => {
                            let (up, low) = (head(*upper)?, head(Some(*lower))?);
                            let mut scores = vec![0.0f32; up.len()];
                            for ((o, u), l) in scores.chunks_mut(vocab).zip(up.chunks(vocab)).zip(low.chunks(vocab)) {
                                math::acd(u, l, *alpha, *min_candidates, o);
                            }
                            Ok(scores)
                        }
                    })
                    .collect()
            }
        }
    }
}

//! How self-speculation adapts to what it measures: which exit drafts, how many drafts a round
//! makes, and whether speculating pays at all.
//!
//! - Drafts per round follow the acceptance: one more after a round that kept every draft, the kept
//!   count plus one after one that did not (per draft exit).
//! - Speculation pays when its measured seconds per token (a moving average per draft exit) are
//!   below plain decoding's. Weight bytes alone do not say: a model that fits the caches is bound by
//!   arithmetic and per-step costs, where drafting only adds work. A round that keeps no draft, or a
//!   pace above plain's, turns speculation off for a while (32 plain steps, twice as long after each
//!   further loss); the plain steps measure the plain pace.
//! - With several candidate exits (`--speculate auto`), the one in use is compared now and then
//!   with a neighbouring exit (a short trial while speculation pays; rarer after each trial the
//!   neighbour loses), and the faster is kept; after
//!   a loss the next try goes to an exit not tried yet (deeper when the drafts were rejected,
//!   shallower when they were kept but cost too much), else to the fastest measured. Exploring
//!   only while speculation pays, and retrying only after the plain stretch, keeps the cost on a
//!   model whose exits never agree to one losing round per retry.

use super::LayerStats;

/// Rounds at one exit before the first trial of a neighbour (twice as many after each trial the
/// neighbour loses, up to the maximum), and rounds a trial lasts.
const ROUNDS_BETWEEN_TRIALS: usize = 16;
const MAX_ROUNDS_BETWEEN_TRIALS: usize = 256;
const TRIAL_ROUNDS: usize = 4;
/// Plain steps after the first loss; doubled after each further one, up to the maximum.
const FIRST_BACKOFF: usize = 32;
const MAX_BACKOFF: usize = 512;

/// One candidate draft exit.
struct Candidate {
    layer: usize,
    /// Drafts the next round at this exit makes.
    drafts: usize,
    /// Seconds per token of the current stretch of rounds here (moving average), and of the last
    /// finished stretch.
    pace: Option<f64>,
    measured: Option<f64>,
    stats: LayerStats,
}

/// The adaptation state of one generation.
pub(super) struct Adaptation {
    adaptive: bool,
    max_drafts: usize,
    /// Candidate exits in the order they are tried (the default first).
    candidates: Vec<Candidate>,
    current: usize,
    /// Seconds per plain step (moving average).
    plain: Option<f64>,
    /// Plain steps left before speculation is tried again, and the next stretch after a loss.
    off_for: usize,
    backoff: usize,
    /// A trial of a neighbouring exit: the candidate it may replace and rounds left.
    trial: Option<(usize, usize)>,
    rounds_since_trial: usize,
    rounds_between_trials: usize,
    /// Whether the next trial looks below the exit in use first (else above).
    trial_below: bool,
}

fn average(slot: &mut Option<f64>, value: f64) {
    *slot = Some(match *slot {
        Some(old) => 0.7 * old + 0.3 * value,
        None => value,
    });
}

impl Adaptation {
    /// `layers`: the candidate exits, the default first. Not adaptive: always `max_drafts` drafts
    /// from the first exit, never off.
    pub(super) fn new(layers: &[usize], max_drafts: usize, adaptive: bool) -> Self {
        let candidates = layers
            .iter()
            .map(|&layer| Candidate {
                layer,
                drafts: if adaptive { 1 } else { max_drafts },
                pace: None,
                measured: None,
                stats: LayerStats { layer, ..Default::default() },
            })
            .collect();
        Adaptation {
            adaptive,
            max_drafts,
            candidates,
            current: 0,
            plain: None,
            // The first plain steps measure the plain pace.
            off_for: if adaptive { 2 } else { 0 },
            backoff: FIRST_BACKOFF,
            trial: None,
            rounds_since_trial: 0,
            rounds_between_trials: ROUNDS_BETWEEN_TRIALS,
            trial_below: true,
        }
    }

    /// The next round's draft exit and drafts, or `None` for a plain step.
    pub(super) fn next_round(&self) -> Option<(usize, usize)> {
        let candidate = &self.candidates[self.current];
        (self.off_for == 0).then_some((candidate.layer, candidate.drafts))
    }

    /// A plain step took `seconds`.
    pub(super) fn plain_step(&mut self, seconds: f64) {
        average(&mut self.plain, seconds);
        self.off_for = self.off_for.saturating_sub(1);
    }

    /// A round at the current exit drafted `drafted`, kept `accepted` and took `seconds`.
    pub(super) fn round(&mut self, drafted: usize, accepted: usize, seconds: f64) {
        let max_drafts = self.max_drafts;
        let here = &mut self.candidates[self.current];
        here.stats.rounds += 1;
        here.stats.drafted += drafted;
        here.stats.accepted += accepted;
        if !self.adaptive {
            return;
        }
        average(&mut here.pace, seconds / (accepted + 1) as f64);
        here.drafts = if accepted == drafted { here.drafts + 1 } else { accepted + 1 }.clamp(1, max_drafts);
        let slower_than_plain = matches!((here.pace, self.plain), (Some(s), Some(p)) if s > p);
        // A round that kept no draft cost more than the plain step it replaced, whatever the clock says.
        let lost = accepted == 0 || slower_than_plain;
        if let Some((home, left)) = self.trial {
            if lost || left <= 1 {
                // The trial is over: keep the neighbour only if it measured faster than home.
                let (trial_pace, home_pace) = (self.candidates[self.current].pace, self.candidates[home].pace);
                let better = matches!((trial_pace, home_pace), (Some(t), Some(h)) if t < h);
                self.finish_stretch();
                if lost || !better {
                    self.current = home;
                    self.rounds_between_trials = (2 * self.rounds_between_trials).min(MAX_ROUNDS_BETWEEN_TRIALS);
                } else {
                    self.rounds_between_trials = ROUNDS_BETWEEN_TRIALS;
                }
                self.trial = None;
                self.rounds_since_trial = 0;
            } else {
                self.trial = Some((home, left - 1));
            }
            return;
        }
        if lost {
            // Not paying: decode plainly for a while (longer each time), then try again.
            self.finish_stretch();
            self.candidates[self.current].drafts = 1;
            self.off_for = self.backoff;
            self.backoff = (2 * self.backoff).min(MAX_BACKOFF);
            self.current = self.retry_choice(accepted == 0);
            return;
        }
        self.backoff = FIRST_BACKOFF;
        self.rounds_since_trial += 1;
        if self.rounds_since_trial >= self.rounds_between_trials {
            self.rounds_since_trial = 0;
            if let Some(neighbour) = self.neighbour() {
                self.trial = Some((self.current, TRIAL_ROUNDS));
                self.current = neighbour;
                self.candidates[neighbour].pace = None;
            }
        }
    }

    /// Ends the current exit's stretch of rounds: its pace becomes its measured one.
    fn finish_stretch(&mut self) {
        let here = &mut self.candidates[self.current];
        if let Some(pace) = here.pace.take() {
            here.measured = Some(pace);
        }
    }

    /// The exit to try after a loss: one not tried yet, nearest above the exit that lost when its
    /// drafts were rejected (a deeper exit agrees more with the plan), nearest below when they were
    /// kept but did not pay (a shallower exit drafts for less); else the fastest measured.
    fn retry_choice(&self, rejected: bool) -> usize {
        let layer = self.candidates[self.current].layer;
        let untried = |i: &usize| self.candidates[*i].stats.rounds == 0;
        let distance = |i: &usize| self.candidates[*i].layer.abs_diff(layer);
        let on_side = |i: &usize| (self.candidates[*i].layer > layer) == rejected;
        let all = 0..self.candidates.len();
        if let Some(next) = all.clone().filter(untried).filter(on_side).min_by_key(distance) {
            return next;
        }
        if let Some(next) = all.clone().filter(untried).min_by_key(distance) {
            return next;
        }
        all.min_by(|&a, &b| {
            let pace = |i: usize| self.candidates[i].measured.unwrap_or(f64::INFINITY);
            pace(a).total_cmp(&pace(b))
        })
        .unwrap_or(self.current)
    }

    /// The next exit below or above the current one (alternating), if there is one.
    fn neighbour(&mut self) -> Option<usize> {
        let layer = self.candidates[self.current].layer;
        let below = (0..self.candidates.len())
            .filter(|&i| self.candidates[i].layer < layer)
            .max_by_key(|&i| self.candidates[i].layer);
        let above = (0..self.candidates.len())
            .filter(|&i| self.candidates[i].layer > layer)
            .min_by_key(|&i| self.candidates[i].layer);
        let side = if self.trial_below { below.or(above) } else { above.or(below) };
        self.trial_below = !self.trial_below;
        side
    }

    /// What each exit that drafted did, in the order of the layers.
    pub(super) fn stats(&self) -> Vec<LayerStats> {
        let mut stats: Vec<LayerStats> =
            self.candidates.iter().filter(|c| c.stats.rounds > 0).map(|c| c.stats.clone()).collect();
        stats.sort_by_key(|s| s.layer);
        stats
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drafts_follow_the_acceptance() {
        let mut a = Adaptation::new(&[4], 6, true);
        a.plain_step(1.0);
        a.plain_step(1.0);
        assert_eq!(a.next_round(), Some((4, 1)));
        a.round(1, 1, 1.0); // 2 tokens in 1 s: pays
        assert_eq!(a.next_round(), Some((4, 2)));
        a.round(2, 2, 1.0);
        a.round(3, 1, 1.0);
        assert_eq!(a.next_round(), Some((4, 2)), "one more than the kept drafts");
    }

    #[test]
    fn a_losing_exit_turns_speculation_off_and_the_next_try_goes_elsewhere() {
        let mut a = Adaptation::new(&[12, 8, 16], 6, true);
        a.plain_step(1.0);
        a.plain_step(1.0);
        a.round(1, 0, 1.2);
        assert_eq!(a.next_round(), None, "off after a round that kept nothing");
        for _ in 0..FIRST_BACKOFF {
            assert_eq!(a.next_round(), None);
            a.plain_step(1.0);
        }
        assert_eq!(a.next_round(), Some((16, 1)), "rejected drafts: a deeper exit not tried yet");
        a.round(3, 1, 3.0); // kept a draft, but slower than plain
        for _ in 0..2 * FIRST_BACKOFF {
            a.plain_step(1.0);
        }
        assert_eq!(a.next_round().map(|r| r.0), Some(8), "kept but too slow: a shallower exit not tried yet");
    }

    #[test]
    fn a_faster_neighbour_replaces_the_exit_in_use() {
        // Exit 8 drafts tokens at 0.4 s each, exit 12 at 0.5 s (plain: 1 s).
        let mut a = Adaptation::new(&[12, 8, 16], 6, true);
        a.plain_step(1.0);
        a.plain_step(1.0);
        let pace = |layer: usize| match layer {
            8 => 0.4,
            12 => 0.5,
            _ => 0.9,
        };
        for _ in 0..200 {
            let (layer, drafts) = a.next_round().expect("speculation pays");
            a.round(drafts, drafts, pace(layer) * (drafts + 1) as f64);
        }
        assert_eq!(a.next_round().map(|r| r.0), Some(8));
        let stats = a.stats();
        let rounds = |layer: usize| stats.iter().find(|s| s.layer == layer).map_or(0, |s| s.rounds);
        assert!(rounds(8) > rounds(12) && rounds(12) >= ROUNDS_BETWEEN_TRIALS, "{:?}", (rounds(8), rounds(12)));
    }

    #[test]
    fn fixed_drafts_never_adapt() {
        let mut a = Adaptation::new(&[3], 5, false);
        for _ in 0..10 {
            assert_eq!(a.next_round(), Some((3, 5)));
            a.round(5, 0, 10.0);
        }
    }
}

//! Speculative sampling's acceptance rule (Leviathan et al. 2023, Chen et al. 2023): a draft `x`
//! drawn from the draft distribution `q` is kept with probability `min(1, p(x) / q(x))`, where `p`
//! is the distribution plain sampling draws from at that position; when it is not kept, the token
//! is drawn from the residual `max(0, p - q)`, renormalised. Whatever `q` is, the token that comes
//! out is distributed exactly as `p`:
//!
//! P(y) = q(y) min(1, p(y)/q(y)) + (1 - sum_x min(q(x), p(x))) * max(0, p(y) - q(y)) / Z
//!      = min(q(y), p(y)) + max(0, p(y) - q(y))                 (Z = 1 - sum_x min(q(x), p(x)))
//!      = p(y).
//!
//! So sampling with speculation draws what plain sampling draws; only the random stream differs.

use rand_chacha::ChaCha8Rng;

use crate::generation::search::{draw, uniform};

/// What verification made of a draft.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// The draft stands.
    Accept,
    /// The draft is rejected; this token (drawn from the residual) takes its place.
    Replace(u32),
}

/// Verifies `draft` (drawn from `q`) against the target distribution `p` (both probabilities over
/// the vocabulary).
pub(crate) fn verify_draft(p: &[f32], q: &[f32], draft: u32, rng: &mut ChaCha8Rng) -> Verdict {
    let (target, proposed) = (p[draft as usize] as f64, q[draft as usize] as f64);
    // A draft q could not draw (q(x) = 0) never reaches here; `>=` keeps p(x) >= q(x) certain.
    if target >= proposed || uniform(rng) * proposed < target {
        return Verdict::Accept;
    }
    let residual: Vec<f64> = p.iter().zip(q).map(|(&p, &q)| (p as f64 - q as f64).max(0.0)).collect();
    let total: f64 = residual.iter().sum();
    if total <= 0.0 {
        // p and q agree to rounding (then the draft is all but always accepted): draw from p.
        return Verdict::Replace(draw(p, rng));
    }
    let normalised: Vec<f32> = residual.iter().map(|&r| (r / total) as f32).collect();
    Verdict::Replace(draw(&normalised, rng))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand_chacha::rand_core::SeedableRng;

    /// Pearson's chi-square of `counts` against `probs` (cells with p = 0 must be empty).
    fn chi_square(counts: &[usize], probs: &[f32]) -> f64 {
        let n: usize = counts.iter().sum();
        let mut chi2 = 0.0;
        for (&c, &p) in counts.iter().zip(probs) {
            if p == 0.0 {
                assert_eq!(c, 0, "a token with p = 0 came out");
                continue;
            }
            let expected = n as f64 * p as f64;
            chi2 += (c as f64 - expected).powi(2) / expected;
        }
        chi2
    }

    fn normalised(weights: &[f32]) -> Vec<f32> {
        let total: f32 = weights.iter().sum();
        weights.iter().map(|w| w / total).collect()
    }

    #[test]
    fn drafts_verified_by_the_rule_are_distributed_as_the_target() {
        // q puts mass where p has none (token 0), too much on some, too little or none on others.
        let p = normalised(&[0.0, 1.0, 4.0, 2.0, 0.5, 3.0, 1.5, 0.0]);
        let q = normalised(&[2.0, 3.0, 1.0, 2.0, 0.0, 0.5, 1.5, 1.0]);
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        let (mut counts, mut accepted) = (vec![0usize; p.len()], 0usize);
        let draws = 60_000;
        for _ in 0..draws {
            let x = draw(&q, &mut rng);
            let token = match verify_draft(&p, &q, x, &mut rng) {
                Verdict::Accept => {
                    accepted += 1;
                    x
                }
                Verdict::Replace(y) => {
                    assert!(p[y as usize] > q[y as usize], "a replacement comes from where p exceeds q");
                    y
                }
            };
            counts[token as usize] += 1;
        }
        // Critical value of chi-square at p = 0.001 for 5 degrees of freedom (6 possible tokens).
        let chi2 = chi_square(&counts, &p);
        assert!(chi2 < 20.52, "chi-square {chi2}: {counts:?}");
        // The acceptance rate is sum_x min(p(x), q(x)).
        let expected: f64 = p.iter().zip(&q).map(|(&a, &b)| a.min(b) as f64).sum();
        let rate = accepted as f64 / draws as f64;
        assert!((rate - expected).abs() < 0.01, "accepted {rate}, expected {expected}");
    }

    #[test]
    fn a_draft_from_the_target_itself_is_always_accepted() {
        let p = normalised(&[1.0, 2.0, 3.0, 4.0]);
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        for x in 0..4 {
            assert_eq!(verify_draft(&p, &p, x, &mut rng), Verdict::Accept);
        }
    }
}

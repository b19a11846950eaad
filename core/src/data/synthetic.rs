//! Built-in synthetic data, so the default run needs no download.
//!
//! `MarkovSource`: a random order-k Markov chain over a vocabulary; each context has
//! `branching` possible successors with random probabilities. Its entropy rate
//! H = Σ_s π(s) H(P(·|s)) is computed exactly (π the stationary distribution over contexts,
//! by power iteration), so a run can report how far its loss is from the best achievable.
//!
//! `synthetic_images`: a class-conditional image task — each class has a random prototype, a
//! sample is its class prototype plus Gaussian noise — for the MLP and ResNet.

use super::ImageSet;
use crate::rng::Rng;

pub struct MarkovSource {
    pub vocab: usize,
    pub order: usize,
    /// For each context state (base-`vocab` number of the last `order` tokens): successors and
    /// their cumulative probabilities.
    next: Vec<(Vec<u32>, Vec<f64>)>,
    probs: Vec<Vec<f64>>,
}

impl MarkovSource {
    pub fn new(vocab: usize, order: usize, branching: usize, seed: u64) -> MarkovSource {
        let states = vocab.pow(order as u32);
        let mut rng = Rng::stream(seed, 0x4d41524b);
        let mut next = Vec::with_capacity(states);
        let mut probs = Vec::with_capacity(states);
        for _ in 0..states {
            let succ: Vec<u32> = rng.permutation(vocab)[..branching.min(vocab)].iter().map(|&x| x as u32).collect();
            let w: Vec<f64> = succ.iter().map(|_| (1.5 * rng.normal()).exp()).collect();
            let z: f64 = w.iter().sum();
            let p: Vec<f64> = w.iter().map(|x| x / z).collect();
            let mut cum = 0.0;
            let c: Vec<f64> = p
                .iter()
                .map(|x| {
                    cum += x;
                    cum
                })
                .collect();
            next.push((succ, c));
            probs.push(p);
        }
        MarkovSource { vocab, order, next, probs }
    }

    fn step_state(&self, s: usize, tok: u32) -> usize {
        (s * self.vocab + tok as usize) % self.next.len()
    }

    /// `n` tokens from a start state drawn with `seed`.
    pub fn sample(&self, n: usize, seed: u64) -> Vec<u32> {
        let mut rng = Rng::stream(seed, 0x53414d50);
        let mut s = rng.below(self.next.len() as u64) as usize;
        (0..n)
            .map(|_| {
                let (succ, cum) = &self.next[s];
                let u = rng.uniform();
                let k = cum.iter().position(|&c| u < c).unwrap_or(succ.len() - 1);
                let t = succ[k];
                s = self.step_state(s, t);
                t
            })
            .collect()
    }

    /// Entropy rate in nats per token.
    pub fn entropy_rate(&self) -> f64 {
        let n = self.next.len();
        let mut pi = vec![1.0 / n as f64; n];
        for _ in 0..2000 {
            let mut nxt = vec![0.0; n];
            for s in 0..n {
                for (t, p) in self.next[s].0.iter().zip(&self.probs[s]) {
                    nxt[self.step_state(s, *t)] += pi[s] * p;
                }
            }
            // Lazy chain (average with the previous iterate) so periodic chains converge too.
            let diff: f64 = nxt.iter().zip(&pi).map(|(a, b)| (a - b).abs()).sum();
            for (p, q) in pi.iter_mut().zip(&nxt) {
                *p = 0.5 * (*p + q);
            }
            if diff < 1e-13 {
                break;
            }
        }
        let h: f64 = (0..n).map(|s| pi[s] * -self.probs[s].iter().map(|p| p * p.ln()).sum::<f64>()).sum();
        // A deterministic source (one token, or one successor each) sums to −0: print it as 0.
        h.abs()
    }
}

/// `n` images of `shape` in `classes` classes: sample i has label i mod classes and pixels
/// prototype[label]·signal + N(0, 1)·noise, drawn from its own RNG stream (so the set does not
/// depend on how it is split or read).
pub fn synthetic_images(n: usize, shape: [usize; 3], classes: usize, noise: f64, seed: u64) -> ImageSet {
    let per: usize = shape.iter().product();
    let mut prng = Rng::stream(seed, 0x50524f54);
    let protos: Vec<f32> = (0..classes * per).map(|_| prng.normal() as f32).collect();
    let mut pixels = Vec::with_capacity(n * per);
    let mut labels = Vec::with_capacity(n);
    for i in 0..n {
        let label = i % classes;
        let mut r = Rng::stream(seed, 1_000_000 + i as u64);
        pixels.extend(protos[label * per..(label + 1) * per].iter().map(|&p| p + (noise * r.normal()) as f32));
        labels.push(label as u32);
    }
    ImageSet { pixels, labels, shape }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn markov_entropy_matches_empirical_rate() {
        let m = MarkovSource::new(8, 2, 3, 1);
        let h = m.entropy_rate();
        assert!(h > 0.0 && h < (3f64).ln() + 1e-9, "h = {h}");
        // Empirical: average -log p(next | state) over a long sample.
        let toks = m.sample(200_000, 5);
        let mut s = 0usize;
        for &t in &toks[..2] {
            s = m.step_state(s, t);
        }
        let mut nll = 0.0;
        for &t in &toks[2..] {
            let k = m.next[s].0.iter().position(|&x| x == t).expect("successor");
            nll -= m.probs[s][k].ln();
            s = m.step_state(s, t);
        }
        let emp = nll / (toks.len() - 2) as f64;
        assert!((emp - h).abs() < 0.02, "empirical {emp} vs exact {h}");
        assert_eq!(m.sample(100, 5), toks[..100]);
    }

    #[test]
    fn a_deterministic_source_has_entropy_plus_zero() {
        for (vocab, branching) in [(1, 1), (5, 1)] {
            let h = MarkovSource::new(vocab, 1, branching, 1).entropy_rate();
            assert!(h == 0.0 && h.is_sign_positive(), "vocab {vocab}, branching {branching}: {h}");
        }
    }

    #[test]
    fn images_are_deterministic_and_class_conditional() {
        let a = synthetic_images(20, [1, 2, 2], 4, 0.1, 3);
        let b = synthetic_images(20, [1, 2, 2], 4, 0.1, 3);
        assert_eq!(a.pixels, b.pixels);
        assert_eq!(a.labels[..5], [0, 1, 2, 3, 0]);
        // same class, low noise → close; different classes → far
        let d = |i: usize, j: usize| -> f32 { (0..4).map(|k| (a.pixels[i * 4 + k] - a.pixels[j * 4 + k]).powi(2)).sum() };
        assert!(d(0, 4) < 0.5 && d(0, 1) > d(0, 4));
    }
}

//! A small, seedable, serialisable RNG (xoshiro256++ seeded through SplitMix64). Parameter init,
//! synthetic data and samplers all draw from it, so a run is a pure function of its seed, and a
//! checkpoint can save the RNG state as four integers for bitwise-exact resume.
//!
//! Beside it, counter-based draws ([`key_of`], [`draw`]): a value that is a pure function of a
//! key and an index, with no state to carry. Random LM windows and dropout masks use them, keyed
//! by (seed, step, rank, micro-step, ...), so a resumed run draws exactly what the uninterrupted
//! one did, and a CUDA kernel regenerates the same dropout mask as the CPU (integer arithmetic
//! only: `dpt_draw` in `kernels/cuda/common.cuh` is this function).

/// SplitMix64's increment: the golden ratio in 64 bits.
pub const GOLDEN: u64 = 0x9E37_79B9_7F4A_7C15;

/// SplitMix64's output function: a bijective 64-bit mixer.
pub fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A key for counter-based draws from a tuple of integers (order matters).
pub fn key_of(parts: &[u64]) -> u64 {
    parts.iter().fold(0x6A09_E667_F3BC_C909, |k, &p| mix64(k ^ mix64(p.wrapping_add(GOLDEN))))
}

/// The `i`-th 64-bit draw of the stream `key`.
pub fn draw(key: u64, i: u64) -> u64 {
    mix64(key.wrapping_add(i.wrapping_mul(GOLDEN)))
}

/// Uniform integer in [0, n) from a 64-bit draw (multiply-shift).
pub fn below_from(draw: u64, n: u64) -> u64 {
    ((draw as u128 * n as u128) >> 64) as u64
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Rng {
    s: [u64; 4],
}

fn splitmix(x: &mut u64) -> u64 {
    *x = x.wrapping_add(GOLDEN);
    mix64(*x)
}

impl Rng {
    pub fn new(seed: u64) -> Rng {
        let mut x = seed;
        Rng { s: [splitmix(&mut x), splitmix(&mut x), splitmix(&mut x), splitmix(&mut x)] }
    }
    /// An independent stream derived from `seed` and a stream number (e.g. a parameter index).
    pub fn stream(seed: u64, stream: u64) -> Rng {
        Rng::new(seed ^ stream.wrapping_mul(0xD1B5_4A32_D192_ED03).rotate_left(17))
    }
    pub fn next_u64(&mut self) -> u64 {
        let s = &mut self.s;
        let r = (s[0].wrapping_add(s[3])).rotate_left(23).wrapping_add(s[0]);
        let t = s[1] << 17;
        s[2] ^= s[0];
        s[3] ^= s[1];
        s[1] ^= s[2];
        s[0] ^= s[3];
        s[2] ^= t;
        s[3] = s[3].rotate_left(45);
        r
    }
    /// Uniform in [0, 1).
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }
    /// Uniform integer in [0, n).
    pub fn below(&mut self, n: u64) -> u64 {
        // Lemire's multiply-shift; the tiny bias for huge n is irrelevant here.
        ((self.next_u64() as u128 * n as u128) >> 64) as u64
    }
    /// Standard normal (Box–Muller).
    pub fn normal(&mut self) -> f64 {
        let u1 = 1.0 - self.uniform();
        let u2 = self.uniform();
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
    }
    /// Fisher–Yates permutation of 0..n.
    pub fn permutation(&mut self, n: usize) -> Vec<usize> {
        let mut p: Vec<usize> = (0..n).collect();
        for i in (1..n).rev() {
            let j = self.below(i as u64 + 1) as usize;
            p.swap(i, j);
        }
        p
    }
    pub fn state(&self) -> [u64; 4] {
        self.s
    }
    pub fn from_state(s: [u64; 4]) -> Rng {
        Rng { s }
    }
}

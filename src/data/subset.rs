//! Seeded subsets: the same `(n, seed)` picks the same indices on every machine (ChaCha8 is
//! portable and its stream is fixed by the locked crate version).

use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;

use super::error::{DataError, Result};

/// `n` distinct indices out of `0..len`, sorted, chosen by `seed`. `n == len` returns all.
pub fn seeded_subset(len: usize, n: usize, seed: u64) -> Result<Vec<usize>> {
    if n > len {
        return Err(DataError::Setting {
            field: "subset",
            value: n.to_string(),
            expected: format!("at most the split's size, {len}"),
        });
    }
    let mut all: Vec<usize> = (0..len).collect();
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let (chosen, _) = all.partial_shuffle(&mut rng, n);
    let mut chosen = chosen.to_vec();
    chosen.sort_unstable();
    Ok(chosen)
}

/// A seeded permutation of `0..len` (for shuffling an epoch).
pub fn permutation(len: usize, seed: u64) -> Vec<usize> {
    let mut all: Vec<usize> = (0..len).collect();
    all.shuffle(&mut ChaCha8Rng::seed_from_u64(seed));
    all
}

/// Mixes several numbers into one seed (splitmix64 finaliser), so that (seed, epoch, index)
/// triples give independent streams.
pub fn mix(parts: &[u64]) -> u64 {
    let mut h: u64 = 0x9E37_79B9_7F4A_7C15;
    for &p in parts {
        let mut z = h ^ p.wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        h = z ^ (z >> 31);
    }
    h
}

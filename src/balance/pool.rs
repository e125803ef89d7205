//! [`Pool`]: the endpoints a pick draws from, with Vose's alias table when their weights
//! differ, so that a draw in proportion to weight costs one random number and one lookup.

/// The endpoints a pick draws from: all of them, or a subset (the local zone), with an alias
/// table when their weights differ.
pub(crate) struct Pool {
    /// Indices into the snapshot; `None` for all of them.
    indices: Option<Box<[usize]>>,
    len: usize,
    /// `None` when all weights are equal: draws are then uniform.
    alias: Option<Box<[Alias]>>,
}

/// One column of Vose's alias table: position `i` keeps its own index with probability
/// `keep / 2^32`, else it gives `alias`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Alias {
    keep: u64,
    alias: u32,
}

impl Pool {
    pub(crate) fn new(indices: Option<Box<[usize]>>, weights: Vec<u64>) -> Self {
        let len = weights.len();
        let uniform = weights.windows(2).all(|w| w[0] == w[1]);
        Self {
            alias: (!uniform).then(|| alias_table(&weights)),
            indices,
            len,
        }
    }

    #[inline]
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// A pool of every endpoint with these weights.
    #[cfg(test)]
    pub(crate) fn with_weights(weights: Vec<u64>) -> Self {
        Self::new(None, weights)
    }

    /// Whether draws are in proportion to differing weights.
    #[inline]
    pub(crate) fn is_weighted(&self) -> bool {
        self.alias.is_some()
    }

    /// The snapshot index of position `position`.
    #[inline]
    pub(crate) fn at(&self, position: usize) -> usize {
        match &self.indices {
            None => position,
            Some(indices) => indices[position],
        }
    }

    /// A position drawn in proportion to weight, from 64 random bits.
    #[inline]
    pub(crate) fn weighted(&self, random: u64) -> usize {
        let column = below(random as u32, self.len);
        match &self.alias {
            Some(table) => {
                let Alias { keep, alias } = table[column];
                if (random >> 32) < keep {
                    column
                } else {
                    alias as usize
                }
            }
            None => column,
        }
    }
}

/// Vose's alias method: `weights.len()` columns from which one uniform column and one coin
/// give a position with probability `weight / total`.
fn alias_table(weights: &[u64]) -> Box<[Alias]> {
    let n = weights.len();
    let total: u128 = weights.iter().map(|&w| u128::from(w)).sum();
    // Each column's share scaled so that the average is 2^32: `scaled[i] = w_i * n * 2^32 / total`.
    let mut scaled: Vec<u128> = weights
        .iter()
        .map(|&w| (u128::from(w) * n as u128) << 32)
        .map(|x| x / total.max(1))
        .collect();
    let full: u128 = 1 << 32;
    let mut table = vec![
        Alias {
            keep: 1 << 32,
            alias: 0
        };
        n
    ];
    let (mut small, mut large): (Vec<usize>, Vec<usize>) = (0..n).partition(|&i| scaled[i] < full);
    while let (Some(s), Some(&l)) = (small.pop(), large.last()) {
        table[s] = Alias {
            keep: scaled[s] as u64,
            alias: l as u32,
        };
        scaled[l] -= full - scaled[s];
        if scaled[l] < full {
            large.pop();
            small.push(l);
        }
    }
    // What is left (rounding) keeps its own column.
    table.into_boxed_slice()
}

/// A uniform index in `0..n` by multiply-shift (no division; bias below 2^-32 * n).
#[inline]
pub(crate) fn below(random: u32, n: usize) -> usize {
    ((u64::from(random) * n as u64) >> 32) as usize
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The probability of each position, read off the table exactly.
    fn probabilities(table: &[Alias]) -> Vec<f64> {
        let n = table.len();
        let mut p = vec![0.0; n];
        for (i, column) in table.iter().enumerate() {
            let keep = column.keep.min(1 << 32) as f64 / (1u64 << 32) as f64;
            p[i] += keep / n as f64;
            p[column.alias as usize] += (1.0 - keep) / n as f64;
        }
        p
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(500))]

        #[test]
        fn alias_tables_give_each_position_its_weight(
            weights in proptest::collection::vec(1u64..10_000, 1..200)
        ) {
            let total: u64 = weights.iter().sum();
            let p = probabilities(&alias_table(&weights));
            for (i, &w) in weights.iter().enumerate() {
                let want = w as f64 / total as f64;
                prop_assert!((p[i] - want).abs() < 1e-6, "{i}: {} vs {want}", p[i]);
            }
        }
    }

    #[test]
    fn uniform_weights_need_no_table() {
        assert!(!Pool::new(None, vec![3, 3, 3]).is_weighted());
        assert!(Pool::new(None, vec![1, 9]).is_weighted());
        let pool = Pool::new(Some(vec![4, 7].into_boxed_slice()), vec![1, 1]);
        assert_eq!((pool.len(), pool.at(0), pool.at(1)), (2, 4, 7));
    }
}

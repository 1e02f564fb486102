//! Wasserstein-1 distances (docs/benchmarks/structured.md).

use std::cmp::Ordering;

use rayon::prelude::*;

use crate::error::{invalid, Result};

/// W1 between samples and a law given by its quantiles at `(i − 0.5)/N`, `N = samples.len()`:
/// `(1/N) Σ |x_(i) − Q_i|` over the terms where both are finite; NaN without samples.
pub fn sample_w1(samples: &[f64], quantiles: &[f64]) -> Result<f64> {
    if samples.len() != quantiles.len() {
        return Err(invalid(
            "quantiles",
            format!(
                "need one quantile per sample ({}), got {}",
                samples.len(),
                quantiles.len()
            ),
        ));
    }
    if samples.is_empty() {
        return Ok(f64::NAN);
    }
    // Integer keys sort about twice as fast as floats with a comparator.
    let mut keys: Vec<u64> = samples.iter().map(|&x| order_key(x)).collect();
    keys.sort_unstable();
    let total: f64 = keys
        .iter()
        .map(|&k| from_order_key(k))
        .zip(quantiles)
        .filter(|(x, q)| x.is_finite() && q.is_finite())
        .map(|(x, q)| (x - q).abs())
        .sum();
    Ok(total / samples.len() as f64)
}

/// An integer with the order of `f64::total_cmp`: flip all bits of negatives, the sign bit of
/// the rest.
fn order_key(x: f64) -> u64 {
    let bits = x.to_bits();
    if bits >> 63 == 1 {
        !bits
    } else {
        bits | (1 << 63)
    }
}

fn from_order_key(key: u64) -> f64 {
    f64::from_bits(if key >> 63 == 1 {
        key & !(1 << 63)
    } else {
        !key
    })
}

/// [`sample_w1`] for many prompts at once; prompt `j` owns `offsets[j]..offsets[j + 1]` of both
/// flat arrays.
pub fn sample_w1_batch(offsets: &[usize], samples: &[f64], quantiles: &[f64]) -> Result<Vec<f64>> {
    if offsets.first() != Some(&0)
        || offsets.last() != Some(&samples.len())
        || samples.len() != quantiles.len()
    {
        return Err(invalid(
            "offsets",
            "must start at 0 and end at the number of samples (= quantiles)",
        ));
    }
    if offsets.windows(2).any(|w| w[0] > w[1]) {
        return Err(invalid("offsets", "must be non-decreasing"));
    }
    offsets
        .par_windows(2)
        .map(|w| sample_w1(&samples[w[0]..w[1]], &quantiles[w[0]..w[1]]))
        .collect()
}

/// Exact W1 between two distributions `p`, `q` on the same sorted support `x`:
/// `Σ_i |P(≤ x_i) − Q(≤ x_i)| (x_{i+1} − x_i)`.
pub fn discrete_w1(x: &[f64], p: &[f64], q: &[f64]) -> Result<f64> {
    if x.len() != p.len() || x.len() != q.len() || x.is_empty() {
        return Err(invalid(
            "support",
            "x, p and q need the same non-zero length",
        ));
    }
    // partial_cmp is None for NaN, so unsorted and non-finite supports are both refused.
    if x.windows(2).any(|w| {
        !matches!(
            w[0].partial_cmp(&w[1]),
            Some(Ordering::Less | Ordering::Equal)
        )
    }) {
        return Err(invalid(
            "support",
            "x must be sorted increasingly and finite",
        ));
    }
    let (mut cp, mut cq, mut total) = (0.0, 0.0, 0.0);
    for i in 0..x.len() - 1 {
        cp += p[i];
        cq += q[i];
        total += (cp - cq).abs() * (x[i + 1] - x[i]);
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sample_w1_sorts_and_skips_infinite_terms() {
        let w = sample_w1(&[3.0, 1.0, 2.0], &[1.0, 2.0, f64::INFINITY]).unwrap();
        assert!((w - 0.0).abs() < 1e-15);
        assert!(sample_w1(&[], &[]).unwrap().is_nan());
    }

    #[test]
    fn discrete_w1_of_shift_is_the_shift() {
        let x = [0.0, 1.0, 2.0];
        assert!((discrete_w1(&x, &[1.0, 0.0, 0.0], &[0.0, 0.0, 1.0]).unwrap() - 2.0).abs() < 1e-15);
        assert_eq!(
            discrete_w1(&x, &[0.2, 0.3, 0.5], &[0.2, 0.3, 0.5]).unwrap(),
            0.0
        );
    }

    #[test]
    fn order_keys_sort_like_total_cmp_and_round_trip() {
        let mut xs = vec![
            3.5,
            -0.0,
            0.0,
            -2.0,
            f64::INFINITY,
            f64::NEG_INFINITY,
            1e-310,
            -1e-310,
            7.0,
            -7.5,
            f64::MIN_POSITIVE,
            f64::MAX,
            f64::MIN,
        ];
        let mut by_key = xs.clone();
        by_key.sort_unstable_by_key(|&x| order_key(x));
        xs.sort_unstable_by(f64::total_cmp);
        let bits = |v: &[f64]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&by_key), bits(&xs));
        assert_eq!(
            bits(
                &xs.iter()
                    .map(|&x| from_order_key(order_key(x)))
                    .collect::<Vec<_>>()
            ),
            bits(&xs)
        );
    }

    #[test]
    fn batch_matches_single() {
        let s = [1.0, 2.0, 5.0];
        let q = [1.5, 2.5, 4.0];
        let b = sample_w1_batch(&[0, 1, 3], &s, &q).unwrap();
        assert_eq!(b[0], sample_w1(&s[..1], &q[..1]).unwrap());
        assert_eq!(b[1], sample_w1(&s[1..], &q[1..]).unwrap());
    }
}

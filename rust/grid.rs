//! Grid arithmetic shared by the output spaces: NumPy-exact index subsampling and the decimal
//! lattice. Every float here is computed the way the NumPy formulation of docs/method.md §4 computes it, so the
//! Rust and Python views of a grid agree bit for bit.

use crate::error::{invalid, Result};

/// Largest number of decimals a canonical string may carry.
pub const MAX_DECIMALS: u32 = 9;
/// Upper limit on `max_bins`: far above the paper's 16384, low enough to catch typos.
pub const MAX_BINS_LIMIT: usize = 1 << 20;

/// 10^-d as the correctly rounded float64 literal (what Python's `10 ** -d` yields).
const STEPS: [f64; (MAX_DECIMALS + 1) as usize] =
    [1.0, 0.1, 0.01, 0.001, 1e-4, 1e-5, 1e-6, 1e-7, 1e-8, 1e-9];

pub fn check_decimals(decimals: u32) -> Result<f64> {
    STEPS.get(decimals as usize).copied().ok_or_else(|| {
        invalid(
            "decimals",
            format!("must be in 0..={MAX_DECIMALS}, got {decimals}"),
        )
    })
}

pub fn check_max_bins(max_bins: usize) -> Result<()> {
    if !(2..=MAX_BINS_LIMIT).contains(&max_bins) {
        return Err(invalid(
            "max_bins",
            format!("must be in 2..={MAX_BINS_LIMIT}, got {max_bins}"),
        ));
    }
    Ok(())
}

/// `np.linspace(0, n - 1, num, dtype=int)`: `num` indices spread evenly over `0..n`, both ends
/// kept. Requires `2 <= num <= n`.
pub fn linspace_indices(n: usize, num: usize) -> Vec<usize> {
    debug_assert!(num >= 2 && num <= n);
    let stop = (n - 1) as f64;
    let step = stop / (num - 1) as f64;
    let mut out: Vec<usize> = (0..num).map(|i| (i as f64 * step) as usize).collect();
    out[num - 1] = n - 1;
    out
}

/// Centers and bin edges of a continuous output space over `[lower, upper]` (docs/method.md §4 steps 2–4).
pub struct ContinuousGrid {
    pub centers: Vec<f64>,
    /// `lower`, the midpoints between consecutive centers, `upper`: one more than `centers`.
    pub edges: Vec<f64>,
}

pub fn continuous_grid(
    lower: f64,
    upper: f64,
    decimals: u32,
    max_bins: usize,
) -> Result<ContinuousGrid> {
    let step = check_decimals(decimals)?;
    check_max_bins(max_bins)?;
    if !(lower.is_finite() && upper.is_finite() && lower < upper) {
        return Err(invalid(
            "bounds",
            format!("need finite lower < upper, got [{lower}, {upper}]"),
        ));
    }
    let k_lo = (lower / step).ceil();
    let k_hi = (upper / step).floor();
    // Integers beyond 2^53 lose exactness as floats; the grid would no longer be a decimal lattice.
    if k_lo.abs() > 9.0e15 || k_hi.abs() > 9.0e15 {
        return Err(invalid(
            "decimals",
            format!("{decimals} decimals over [{lower}, {upper}] exceed float64 integer precision"),
        ));
    }
    let centers = if k_lo > k_hi {
        vec![round_to_decimals((lower + upper) / 2.0, decimals)]
    } else {
        let (k_lo, k_hi) = (k_lo as i64, k_hi as i64);
        let count = (k_hi - k_lo + 1) as usize;
        if count <= max_bins {
            (k_lo..=k_hi).map(|k| k as f64 * step).collect()
        } else {
            linspace_indices(count, max_bins)
                .into_iter()
                .map(|i| (k_lo + i as i64) as f64 * step)
                .collect()
        }
    };
    let mut edges = Vec::with_capacity(centers.len() + 1);
    edges.push(lower);
    edges.extend(centers.windows(2).map(|w| (w[0] + w[1]) / 2.0));
    edges.push(upper);
    Ok(ContinuousGrid { centers, edges })
}

/// Python's `round(x, d)`: the float nearest the correctly rounded d-decimal string of `x`.
pub fn round_to_decimals(x: f64, decimals: u32) -> f64 {
    format_decimal(x, decimals)
        .parse()
        .expect("formatted float parses")
}

/// Python's `f"{x:.{d}f}"`: correctly rounded, ties to even on the exact binary value.
pub fn format_decimal(x: f64, decimals: u32) -> String {
    format!("{:.*}", decimals as usize, x)
}

/// Integer support `lower..=upper` truncated to the first `max_bins` values (docs/method.md §4, integer
/// families). Non-finite ends fall back to Python's `-max_bins // 2` and `max_bins // 2`;
/// reversed ends are swapped.
pub fn integer_values(lower: f64, upper: f64, max_bins: usize) -> Result<Vec<i64>> {
    check_max_bins(max_bins)?;
    let lo = if lower.is_finite() {
        lower
    } else {
        -(max_bins as f64 / 2.0).ceil()
    };
    let hi = if upper.is_finite() {
        upper
    } else {
        (max_bins / 2) as f64
    };
    let (lo, hi) = if lo <= hi { (lo, hi) } else { (hi, lo) };
    if lo.abs() > 9.0e15 || hi.abs() > 9.0e15 {
        return Err(invalid(
            "bounds",
            format!("integer support [{lo}, {hi}] is out of range"),
        ));
    }
    let (lo, hi) = (lo as i64, hi as i64);
    let count = ((hi - lo + 1) as usize).min(max_bins);
    Ok((lo..lo + count as i64).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linspace_keeps_both_ends_and_spreads_evenly() {
        assert_eq!(linspace_indices(10, 4), vec![0, 3, 6, 9]);
        assert_eq!(linspace_indices(5, 5), vec![0, 1, 2, 3, 4]);
        assert_eq!(linspace_indices(11, 2), vec![0, 10]);
    }

    #[test]
    fn grid_is_the_decimal_lattice_with_midpoint_edges() {
        // k · step in float64, as docs/method.md §4 says: 3 × 0.1 is 0.30000000000000004.
        let g = continuous_grid(0.0, 0.5, 1, 100).unwrap();
        assert_eq!(
            g.centers,
            vec![0.0, 0.1, 0.2, 0.30000000000000004, 0.4, 0.5]
        );
        assert_eq!(g.edges.len(), 7);
        assert_eq!(g.edges[0], 0.0);
        assert_eq!(g.edges[6], 0.5);
        assert!((g.edges[1] - 0.05).abs() < 1e-15);
    }

    #[test]
    fn empty_lattice_gives_the_rounded_midpoint() {
        let g = continuous_grid(0.11, 0.14, 1, 100).unwrap();
        assert_eq!(g.centers, vec![0.1]);
        assert_eq!(g.edges, vec![0.11, 0.14]);
    }

    #[test]
    fn formatting_rounds_like_python() {
        assert_eq!(format_decimal(-1.5, 5), "-1.50000");
        assert_eq!(format_decimal(0.0001, 5), "0.00010");
        assert_eq!(format_decimal(0.125, 2), "0.12");
        assert_eq!(format_decimal(2.675, 2), "2.67");
    }

    #[test]
    fn bad_arguments_are_rejected() {
        assert!(continuous_grid(0.0, 1.0, 10, 100).is_err());
        assert!(continuous_grid(0.0, 1.0, 5, 1).is_err());
        assert!(continuous_grid(1.0, 0.0, 5, 100).is_err());
        assert!(integer_values(0.0, 1.0, 0).is_err());
    }

    #[test]
    fn integer_values_truncate_and_fall_back() {
        assert_eq!(integer_values(3.0, 1.0, 10).unwrap(), vec![1, 2, 3]);
        assert_eq!(integer_values(0.0, 100.0, 4).unwrap(), vec![0, 1, 2, 3]);
        assert_eq!(
            integer_values(f64::NEG_INFINITY, 1.0, 4).unwrap(),
            vec![-2, -1, 0, 1]
        );
        assert_eq!(
            integer_values(f64::NEG_INFINITY, f64::INFINITY, 5).unwrap(),
            vec![-3, -2, -1, 0, 1]
        );
    }
}

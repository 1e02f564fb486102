//! Output spaces: canonical strings with their target masses. Numeric spaces discretize a law
//! (docs/method.md §4; the law's CDF/PMF values come from the caller, SciPy); string spaces are
//! weighted lists of arbitrary answers (docs/targets.md), taken as given: no parsing, no bounds.

use crate::error::{invalid, Result};
use crate::grid::{format_decimal, ContinuousGrid};

/// A finite target distribution over canonical strings: numbers in increasing order, or
/// arbitrary strings in the caller's order.
#[derive(Clone, Debug)]
pub struct OutputSpace {
    /// All canonical strings concatenated; `ends[i]` is where string `i` stops.
    text: String,
    ends: Vec<u32>,
    pub probs: Vec<f64>,
    /// Ends of the discretized range; `None` for a space of arbitrary strings.
    pub lower: Option<f64>,
    pub upper: Option<f64>,
    /// Decimals of the canonical strings; `None` for integer and string spaces.
    pub decimals: Option<u32>,
}

impl OutputSpace {
    pub fn len(&self) -> usize {
        self.ends.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ends.is_empty()
    }

    pub fn value(&self, i: usize) -> &str {
        let start = if i == 0 { 0 } else { self.ends[i - 1] as usize };
        &self.text[start..self.ends[i] as usize]
    }

    /// Whether the values are numbers (a discretized law) rather than arbitrary strings.
    pub fn is_numeric(&self) -> bool {
        self.lower.is_some()
    }

    /// The values as numbers (parsed from the canonical strings, so never out of sync with them);
    /// `None` for a space of arbitrary strings.
    pub fn numeric(&self) -> Option<Vec<f64>> {
        self.is_numeric().then(|| {
            self.values()
                .map(|v| v.parse().unwrap_or(f64::NAN))
                .collect()
        })
    }

    pub fn values(&self) -> impl ExactSizeIterator<Item = &str> + '_ {
        (0..self.len()).map(|i| self.value(i))
    }

    /// Continuous family: bin masses from the CDF at the grid's edges, tails clipped to the edge
    /// bins, strings formatted to `decimals` and equal neighbours merged (docs/method.md §4 steps 4–6).
    pub fn continuous(grid: &ContinuousGrid, cdf_at_edges: &[f64], decimals: u32) -> Result<Self> {
        let edges = &grid.edges;
        if cdf_at_edges.len() != edges.len() {
            return Err(invalid(
                "cdf",
                format!(
                    "expected {} CDF values (one per edge), got {}",
                    edges.len(),
                    cdf_at_edges.len()
                ),
            ));
        }
        let mut masses: Vec<f64> = cdf_at_edges.windows(2).map(|w| w[1] - w[0]).collect();
        let last = masses.len() - 1;
        masses[0] += cdf_at_edges[0];
        masses[last] += 1.0 - cdf_at_edges[last + 1];
        let probs = clip_and_normalize(masses)?;

        let mut space = Self::empty(
            Some((edges[0], edges[edges.len() - 1])),
            Some(decimals),
            grid.centers.len(),
        );
        let mut scratch = String::new();
        for (center, p) in grid.centers.iter().zip(probs) {
            scratch.clear();
            scratch.push_str(&format_decimal(*center, decimals));
            if !space.is_empty() && space.value(space.len() - 1) == scratch {
                *space.probs.last_mut().expect("non-empty") += p;
            } else {
                space.push(&scratch, p);
            }
        }
        space.probs = clip_and_normalize(std::mem::take(&mut space.probs))?;
        space.text.shrink_to_fit();
        space.ends.shrink_to_fit();
        Ok(space)
    }

    /// Integer family: masses from the PMF, plus the upper tail on the last value when the
    /// support has no finite maximum (`upper_tail` = 1 − CDF(last value), else 0).
    pub fn integer(values: &[i64], pmf: &[f64], upper_tail: f64) -> Result<Self> {
        if values.is_empty() || pmf.len() != values.len() {
            return Err(invalid(
                "pmf",
                format!(
                    "expected {} PMF values (one per integer), got {}",
                    values.len(),
                    pmf.len()
                ),
            ));
        }
        let mut masses = pmf.to_vec();
        *masses.last_mut().expect("non-empty") += upper_tail;
        let probs = clip_and_normalize(masses)?;
        let mut space = Self::empty(
            Some((values[0] as f64, values[values.len() - 1] as f64)),
            None,
            values.len(),
        );
        for (v, p) in values.iter().zip(probs) {
            space.push(&v.to_string(), p);
        }
        Ok(space)
    }

    /// A space of arbitrary strings with the given weights (normalized to sum 1), in the given
    /// order. Strings are never parsed; they must be non-empty and distinct, and the weights
    /// finite, non-negative and not all zero (user input: rejected, never clipped).
    pub fn from_parts(values: &[&str], masses: Vec<f64>) -> Result<Self> {
        if values.is_empty() || values.len() != masses.len() {
            return Err(invalid(
                "masses",
                format!(
                    "need one mass per value and at least one value, got {} values and {} masses",
                    values.len(),
                    masses.len()
                ),
            ));
        }
        if let Some(i) = values.iter().position(|v| v.is_empty()) {
            return Err(invalid("values", format!("value {i} is an empty string")));
        }
        let mut seen = std::collections::HashMap::with_capacity(values.len());
        for (i, v) in values.iter().enumerate() {
            if let Some(first) = seen.insert(*v, i) {
                return Err(invalid(
                    "values",
                    format!("{v:?} appears twice (values {first} and {i})"),
                ));
            }
        }
        if let Some(m) = masses.iter().find(|m| !(m.is_finite() && **m >= 0.0)) {
            return Err(invalid(
                "masses",
                format!("masses must be finite and non-negative, got {m}"),
            ));
        }
        let total: f64 = masses.iter().sum();
        if !(total > 0.0 && total.is_finite()) {
            return Err(invalid(
                "masses",
                "masses must not all be zero and must have a finite sum",
            ));
        }
        let mut space = Self::empty(None, None, values.len());
        for (v, m) in values.iter().zip(masses) {
            space.push(v, m / total);
        }
        Ok(space)
    }

    fn empty(bounds: Option<(f64, f64)>, decimals: Option<u32>, capacity: usize) -> Self {
        Self {
            text: String::with_capacity(capacity * 8),
            ends: Vec::with_capacity(capacity),
            probs: Vec::with_capacity(capacity),
            lower: bounds.map(|b| b.0),
            upper: bounds.map(|b| b.1),
            decimals,
        }
    }

    fn push(&mut self, value: &str, prob: f64) {
        self.text.push_str(value);
        self.ends.push(self.text.len() as u32);
        self.probs.push(prob);
    }
}

/// Clip negative masses (CDF round-off) to zero and rescale to sum 1.
fn clip_and_normalize(mut masses: Vec<f64>) -> Result<Vec<f64>> {
    let mut total = 0.0;
    for m in masses.iter_mut() {
        if m.is_nan() {
            return Err(invalid("cdf", "the law's CDF/PMF returned NaN"));
        }
        *m = m.max(0.0);
        total += *m;
    }
    if !(total > 0.0 && total.is_finite()) {
        return Err(invalid(
            "masses",
            "the law puts no mass on the output space",
        ));
    }
    masses.iter_mut().for_each(|m| *m /= total);
    Ok(masses)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::grid::continuous_grid;

    #[test]
    fn uniform_on_unit_interval_has_equal_inner_bins_and_half_edge_bins() {
        let grid = continuous_grid(0.0, 1.0, 1, 100).unwrap();
        let cdf: Vec<f64> = grid.edges.clone();
        let s = OutputSpace::continuous(&grid, &cdf, 1).unwrap();
        assert_eq!(s.len(), 11);
        assert_eq!(s.value(0), "0.0");
        assert_eq!(s.value(10), "1.0");
        assert!((s.probs[0] - 0.05).abs() < 1e-12);
        assert!((s.probs[5] - 0.1).abs() < 1e-12);
        assert!((s.probs.iter().sum::<f64>() - 1.0).abs() < 1e-12);
    }

    #[test]
    fn tails_go_to_the_edge_bins() {
        let grid = continuous_grid(0.0, 1.0, 0, 100).unwrap();
        // CDF(lower) = 0.2 and 1 - CDF(upper) = 0.3 land on the first and last bins.
        let s = OutputSpace::continuous(&grid, &[0.2, 0.45, 0.7], 0).unwrap();
        assert_eq!(s.probs, vec![0.45, 0.55]);
    }

    #[test]
    fn equal_strings_merge() {
        let grid = ContinuousGrid {
            centers: vec![0.1, 0.1000001, 0.2],
            edges: vec![0.0, 0.1, 0.15, 0.3],
        };
        let s = OutputSpace::continuous(&grid, &[0.0, 0.25, 0.5, 1.0], 1).unwrap();
        assert_eq!(s.values().collect::<Vec<_>>(), vec!["0.1", "0.2"]);
        assert_eq!(s.probs, vec![0.5, 0.5]);
    }

    #[test]
    fn integer_tail_goes_to_last_value() {
        let s = OutputSpace::integer(&[0, 1, 2], &[0.5, 0.25, 0.125], 0.125).unwrap();
        assert_eq!(s.probs, vec![0.5, 0.25, 0.25]);
        assert_eq!(s.value(2), "2");
        assert_eq!(s.numeric(), Some(vec![0.0, 1.0, 2.0]));
        assert_eq!((s.lower, s.upper), (Some(0.0), Some(2.0)));
    }

    #[test]
    fn string_spaces_keep_order_and_have_no_numeric_view() {
        let s = OutputSpace::from_parts(&["Paris", "Lyon", "12"], vec![2.0, 1.0, 1.0]).unwrap();
        assert_eq!(s.values().collect::<Vec<_>>(), vec!["Paris", "Lyon", "12"]);
        assert_eq!(s.probs, vec![0.5, 0.25, 0.25]);
        assert!(!s.is_numeric());
        assert_eq!((s.lower, s.upper, s.decimals), (None, None, None));
        assert_eq!(s.numeric(), None);
    }

    #[test]
    fn bad_string_spaces_are_rejected_with_the_field() {
        let err = |values: &[&str], masses: Vec<f64>| {
            OutputSpace::from_parts(values, masses)
                .unwrap_err()
                .to_string()
        };
        assert!(err(&["a", "b"], vec![1.0]).contains("invalid masses"));
        assert!(err(&[], vec![]).contains("invalid masses"));
        assert!(err(&["a", ""], vec![1.0, 1.0]).contains("invalid values: value 1 is an empty"));
        assert!(
            err(&["a", "b", "a"], vec![1.0; 3]).contains("\"a\" appears twice (values 0 and 2)")
        );
        assert!(err(&["a", "b"], vec![1.0, -0.5]).contains("non-negative"));
        assert!(err(&["a", "b"], vec![1.0, f64::NAN]).contains("non-negative"));
        assert!(err(&["a", "b"], vec![0.0, 0.0]).contains("not all be zero"));
    }

    #[test]
    fn all_zero_mass_is_an_error() {
        assert!(OutputSpace::integer(&[0, 1], &[0.0, 0.0], 0.0).is_err());
    }
}

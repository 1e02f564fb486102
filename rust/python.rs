//! pyo3 bindings: thin wrappers that validate and extract inputs under the GIL, release it for
//! the work, and hand results back as numpy arrays with fixed dtypes (int64 offsets, int32 token
//! ids, float64 probabilities).

use std::sync::Arc;

use numpy::{IntoPyArray, PyArray1, PyReadonlyArray1};
use pyo3::create_exception;
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use rayon::prelude::*;

use crate::error::CoreError;
use crate::{grid, metrics, space, tokenize, trie};

create_exception!(
    _core,
    CalibftError,
    PyValueError,
    "Invalid input to the calibft core."
);

impl From<CoreError> for PyErr {
    fn from(err: CoreError) -> PyErr {
        CalibftError::new_err(err.to_string())
    }
}

type Array<'py, T> = Bound<'py, PyArray1<T>>;

fn slice<'a, T: numpy::Element>(
    arr: &'a PyReadonlyArray1<'_, T>,
    field: &str,
) -> PyResult<&'a [T]> {
    arr.as_slice()
        .map_err(|_| CalibftError::new_err(format!("invalid {field}: array must be contiguous")))
}

fn offsets_to_usize(offsets: &[i64]) -> PyResult<Vec<usize>> {
    offsets
        .iter()
        .map(|&o| {
            usize::try_from(o)
                .map_err(|_| CalibftError::new_err("invalid offsets: must be non-negative"))
        })
        .collect()
}

fn flat_to_numpy<'py>(
    py: Python<'py>,
    offsets: Vec<usize>,
    ids: Vec<u32>,
) -> (Array<'py, i64>, Array<'py, i32>) {
    let offsets: Vec<i64> = offsets.into_iter().map(|o| o as i64).collect();
    let ids: Vec<i32> = ids.into_iter().map(|t| t as i32).collect();
    (offsets.into_pyarray(py), ids.into_pyarray(py))
}

/// A target distribution over canonical strings: a discretized law (numeric order) or a weighted
/// list of arbitrary strings (the caller's order).
#[pyclass(frozen, module = "calibft._core", name = "OutputSpace")]
pub struct PyOutputSpace(Arc<space::OutputSpace>);

#[pymethods]
impl PyOutputSpace {
    #[getter]
    fn values(&self) -> Vec<&str> {
        self.0.values().collect()
    }
    #[getter]
    fn numeric<'py>(&self, py: Python<'py>) -> Option<Array<'py, f64>> {
        self.0.numeric().map(|v| v.into_pyarray(py))
    }
    #[getter]
    fn probs<'py>(&self, py: Python<'py>) -> Array<'py, f64> {
        self.0.probs.clone().into_pyarray(py)
    }
    #[getter]
    fn lower(&self) -> Option<f64> {
        self.0.lower
    }
    #[getter]
    fn upper(&self) -> Option<f64> {
        self.0.upper
    }
    #[getter]
    fn decimals(&self) -> Option<u32> {
        self.0.decimals
    }
    fn __len__(&self) -> usize {
        self.0.len()
    }
}

#[pyfunction]
fn continuous_edges<'py>(
    py: Python<'py>,
    lower: f64,
    upper: f64,
    decimals: u32,
    max_bins: usize,
) -> PyResult<Array<'py, f64>> {
    Ok(grid::continuous_grid(lower, upper, decimals, max_bins)?
        .edges
        .into_pyarray(py))
}

#[pyfunction]
fn continuous_space(
    lower: f64,
    upper: f64,
    decimals: u32,
    max_bins: usize,
    cdf_at_edges: PyReadonlyArray1<'_, f64>,
) -> PyResult<PyOutputSpace> {
    let grid = grid::continuous_grid(lower, upper, decimals, max_bins)?;
    let space =
        space::OutputSpace::continuous(&grid, slice(&cdf_at_edges, "cdf_at_edges")?, decimals)?;
    Ok(PyOutputSpace(Arc::new(space)))
}

#[pyfunction]
fn integer_values<'py>(
    py: Python<'py>,
    lower: f64,
    upper: f64,
    max_bins: usize,
) -> PyResult<Array<'py, i64>> {
    Ok(grid::integer_values(lower, upper, max_bins)?.into_pyarray(py))
}

#[pyfunction]
fn integer_space(
    values: PyReadonlyArray1<'_, i64>,
    pmf: PyReadonlyArray1<'_, f64>,
    upper_tail: f64,
) -> PyResult<PyOutputSpace> {
    let space =
        space::OutputSpace::integer(slice(&values, "values")?, slice(&pmf, "pmf")?, upper_tail)?;
    Ok(PyOutputSpace(Arc::new(space)))
}

#[pyfunction]
fn space_from_parts(
    values: Vec<String>,
    masses: PyReadonlyArray1<'_, f64>,
) -> PyResult<PyOutputSpace> {
    let refs: Vec<&str> = values.iter().map(String::as_str).collect();
    let space = space::OutputSpace::from_parts(&refs, slice(&masses, "masses")?.to_vec())?;
    Ok(PyOutputSpace(Arc::new(space)))
}

/// Tokenizes canonical strings as a model's completion (terminator appended), in Rust.
#[pyclass(frozen, module = "calibft._core", name = "CompletionTokenizer")]
pub struct PyCompletionTokenizer(Arc<tokenize::CompletionTokenizer>);

#[pymethods]
impl PyCompletionTokenizer {
    #[new]
    fn new(py: Python<'_>, tokenizer_json: &str, end_token_id: u32) -> PyResult<Self> {
        let tok = py.detach(|| tokenize::CompletionTokenizer::new(tokenizer_json, end_token_id))?;
        Ok(Self(Arc::new(tok)))
    }
    #[getter]
    fn end_token_id(&self) -> u32 {
        self.0.end_id()
    }
    /// (offsets int64[n+1], ids int32[...]) of each value's completion tokens after `context`.
    fn encode_values<'py>(
        &self,
        py: Python<'py>,
        context: &str,
        values: Vec<String>,
    ) -> PyResult<(Array<'py, i64>, Array<'py, i32>)> {
        let (offsets, ids) = py.detach(|| {
            let refs: Vec<&str> = values.iter().map(String::as_str).collect();
            self.0.with_context(context)?.encode_values_par(&refs)
        })?;
        Ok(flat_to_numpy(py, offsets, ids))
    }
}

/// A prefix trie of completion token sequences, in CSR form.
#[pyclass(frozen, module = "calibft._core", name = "Trie")]
pub struct PyTrie(Arc<trie::Trie>);

#[pymethods]
impl PyTrie {
    #[getter]
    fn num_nodes(&self) -> usize {
        self.0.num_nodes()
    }
    #[getter]
    fn num_values(&self) -> usize {
        self.0.num_values()
    }
    #[getter]
    fn nbytes(&self) -> usize {
        self.0.nbytes()
    }
    #[getter]
    fn node_offsets<'py>(&self, py: Python<'py>) -> Array<'py, i64> {
        self.0
            .offsets()
            .iter()
            .map(|&o| o as i64)
            .collect::<Vec<_>>()
            .into_pyarray(py)
    }
    #[getter]
    fn child_tokens<'py>(&self, py: Python<'py>) -> Array<'py, i32> {
        self.0
            .tokens()
            .iter()
            .map(|&t| t as i32)
            .collect::<Vec<_>>()
            .into_pyarray(py)
    }
    #[getter]
    fn child_probs<'py>(&self, py: Python<'py>) -> Array<'py, f64> {
        self.0.probs().to_vec().into_pyarray(py)
    }
    /// Breadth-first numbering makes edge e lead to node e + 1.
    #[getter]
    fn child_nodes<'py>(&self, py: Python<'py>) -> Array<'py, i32> {
        (1..=self.0.tokens().len() as i32)
            .collect::<Vec<_>>()
            .into_pyarray(py)
    }
    #[getter]
    fn value_probs<'py>(&self, py: Python<'py>) -> Array<'py, f64> {
        self.0.value_mass().into_pyarray(py)
    }
    fn parents<'py>(&self, py: Python<'py>) -> Array<'py, i32> {
        self.0
            .parents()
            .into_iter()
            .map(|p| p as i32)
            .collect::<Vec<_>>()
            .into_pyarray(py)
    }
    fn depths<'py>(&self, py: Python<'py>) -> Array<'py, i32> {
        self.0
            .depths()
            .into_iter()
            .map(|d| d as i32)
            .collect::<Vec<_>>()
            .into_pyarray(py)
    }
    /// (preorder, parent (-1 at the root), depth, value_offsets, value_edges), all int64: what
    /// a tree-attention pass needs of the trie, in one call.
    #[allow(clippy::type_complexity)]
    fn layout<'py>(
        &self,
        py: Python<'py>,
    ) -> (
        Array<'py, i64>,
        Array<'py, i64>,
        Array<'py, i64>,
        Array<'py, i64>,
        Array<'py, i64>,
    ) {
        let layout = py.detach(|| self.0.layout());
        let wide = |v: Vec<u32>| v.into_iter().map(i64::from).collect::<Vec<_>>();
        let offsets: Vec<i64> = layout.value_offsets.into_iter().map(|o| o as i64).collect();
        (
            wide(layout.preorder).into_pyarray(py),
            layout.parent.into_pyarray(py),
            wide(layout.depth).into_pyarray(py),
            offsets.into_pyarray(py),
            wide(layout.value_edges).into_pyarray(py),
        )
    }
    fn value_paths<'py>(&self, py: Python<'py>) -> (Array<'py, i64>, Array<'py, i32>) {
        let t = &self.0;
        let (offsets, ids) =
            py.detach(|| collect_paths((0..t.num_values()).map(|i| t.value_path(i))));
        flat_to_numpy(py, offsets, ids)
    }
    fn sample_paths<'py>(
        &self,
        py: Python<'py>,
        n: usize,
        seed: u64,
    ) -> (Array<'py, i64>, Array<'py, i64>, Array<'py, i32>) {
        let t = &self.0;
        let (values, offsets, ids) = py.detach(|| {
            let values = t.sample_values(n, seed);
            let (offsets, ids) = collect_paths(values.iter().map(|&i| t.value_path(i)));
            (values, offsets, ids)
        });
        let values: Vec<i64> = values.into_iter().map(|v| v as i64).collect();
        let (offsets, ids) = flat_to_numpy(py, offsets, ids);
        (values.into_pyarray(py), offsets, ids)
    }
    fn targets_along<'py>(
        &self,
        py: Python<'py>,
        ids: PyReadonlyArray1<'_, i32>,
    ) -> PyResult<(Array<'py, i64>, Array<'py, i32>, Array<'py, f64>)> {
        let path: Vec<u32> = slice(&ids, "ids")?.iter().map(|&t| t as u32).collect();
        let targets = self.0.targets_along(&path)?;
        let (offsets, tokens) = flat_to_numpy(py, targets.offsets, targets.tokens);
        Ok((offsets, tokens, targets.probs.into_pyarray(py)))
    }
}

fn collect_paths(paths: impl Iterator<Item = Vec<u32>>) -> (Vec<usize>, Vec<u32>) {
    let mut offsets = vec![0];
    let mut ids = Vec::new();
    for p in paths {
        ids.extend(p);
        offsets.push(ids.len());
    }
    (offsets, ids)
}

fn trie_of_space(
    tok: &tokenize::CompletionTokenizer,
    context: &str,
    space: &space::OutputSpace,
) -> crate::Result<trie::Trie> {
    let (offsets, ids) = tok.with_context(context)?.encode_values(space.values())?;
    trie::Trie::build(&offsets, &ids, &space.probs)
}

#[pyfunction]
fn build_trie(
    py: Python<'_>,
    space: &PyOutputSpace,
    tokenizer: &PyCompletionTokenizer,
    context: &str,
) -> PyResult<PyTrie> {
    let (tok, space) = (tokenizer.0.clone(), space.0.clone());
    let trie = py.detach(|| {
        let values: Vec<&str> = space.values().collect();
        let (offsets, ids) = tok.with_context(context)?.encode_values_par(&values)?;
        trie::Trie::build(&offsets, &ids, &space.probs)
    })?;
    Ok(PyTrie(Arc::new(trie)))
}

/// One trie per space (space `i` completing `contexts[i]`), built in parallel with the GIL released.
#[pyfunction]
fn build_tries(
    py: Python<'_>,
    spaces: Vec<PyRef<'_, PyOutputSpace>>,
    tokenizer: &PyCompletionTokenizer,
    contexts: Vec<String>,
) -> PyResult<Vec<PyTrie>> {
    if contexts.len() != spaces.len() {
        return Err(CalibftError::new_err(format!(
            "invalid contexts: need one per space ({}), got {}",
            spaces.len(),
            contexts.len()
        )));
    }
    let spaces: Vec<Arc<space::OutputSpace>> = spaces.iter().map(|s| s.0.clone()).collect();
    let tok = tokenizer.0.clone();
    let tries = py.detach(|| {
        spaces
            .par_iter()
            .zip(contexts.par_iter())
            .map(|(s, c)| trie_of_space(&tok, c, s))
            .collect::<crate::Result<Vec<_>>>()
    })?;
    Ok(tries.into_iter().map(|t| PyTrie(Arc::new(t))).collect())
}

/// A trie from pre-tokenized values (for tokenizers without a fast-tokenizer JSON).
#[pyfunction]
fn build_trie_from_ids(
    py: Python<'_>,
    offsets: PyReadonlyArray1<'_, i64>,
    ids: PyReadonlyArray1<'_, i32>,
    masses: PyReadonlyArray1<'_, f64>,
) -> PyResult<PyTrie> {
    let offsets = offsets_to_usize(slice(&offsets, "offsets")?)?;
    let ids: Vec<u32> = slice(&ids, "ids")?
        .iter()
        .map(|&t| {
            u32::try_from(t)
                .map_err(|_| CalibftError::new_err("invalid ids: token ids must be non-negative"))
        })
        .collect::<PyResult<_>>()?;
    let masses = slice(&masses, "masses")?;
    let trie = py.detach(|| trie::Trie::build(&offsets, &ids, masses))?;
    Ok(PyTrie(Arc::new(trie)))
}

#[pyfunction]
fn sample_w1(
    samples: PyReadonlyArray1<'_, f64>,
    quantiles: PyReadonlyArray1<'_, f64>,
) -> PyResult<f64> {
    Ok(metrics::sample_w1(
        slice(&samples, "samples")?,
        slice(&quantiles, "quantiles")?,
    )?)
}

#[pyfunction]
fn sample_w1_batch<'py>(
    py: Python<'py>,
    offsets: PyReadonlyArray1<'_, i64>,
    samples: PyReadonlyArray1<'_, f64>,
    quantiles: PyReadonlyArray1<'_, f64>,
) -> PyResult<Array<'py, f64>> {
    let offsets = offsets_to_usize(slice(&offsets, "offsets")?)?;
    let (samples, quantiles) = (slice(&samples, "samples")?, slice(&quantiles, "quantiles")?);
    let out = py.detach(|| metrics::sample_w1_batch(&offsets, samples, quantiles))?;
    Ok(out.into_pyarray(py))
}

#[pyfunction]
fn discrete_w1(
    x: PyReadonlyArray1<'_, f64>,
    p: PyReadonlyArray1<'_, f64>,
    q: PyReadonlyArray1<'_, f64>,
) -> PyResult<f64> {
    Ok(metrics::discrete_w1(
        slice(&x, "x")?,
        slice(&p, "p")?,
        slice(&q, "q")?,
    )?)
}

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("CalibftError", m.py().get_type::<CalibftError>())?;
    m.add("MAX_DECIMALS", grid::MAX_DECIMALS)?;
    m.add("MAX_BINS_LIMIT", grid::MAX_BINS_LIMIT)?;
    m.add_class::<PyOutputSpace>()?;
    m.add_class::<PyCompletionTokenizer>()?;
    m.add_class::<PyTrie>()?;
    m.add_function(wrap_pyfunction!(continuous_edges, m)?)?;
    m.add_function(wrap_pyfunction!(continuous_space, m)?)?;
    m.add_function(wrap_pyfunction!(integer_values, m)?)?;
    m.add_function(wrap_pyfunction!(integer_space, m)?)?;
    m.add_function(wrap_pyfunction!(space_from_parts, m)?)?;
    m.add_function(wrap_pyfunction!(build_trie, m)?)?;
    m.add_function(wrap_pyfunction!(build_tries, m)?)?;
    m.add_function(wrap_pyfunction!(build_trie_from_ids, m)?)?;
    m.add_function(wrap_pyfunction!(sample_w1, m)?)?;
    m.add_function(wrap_pyfunction!(sample_w1_batch, m)?)?;
    m.add_function(wrap_pyfunction!(discrete_w1, m)?)?;
    Ok(())
}

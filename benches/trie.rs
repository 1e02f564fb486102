//! Criterion benches of the data path for one 16384-bin prompt: decimal grid + output space,
//! and trie construction from per-character token ids (a single-digit tokenizer's shape).

use calibft::grid::continuous_grid;
use calibft::{OutputSpace, Trie};
use criterion::{criterion_group, criterion_main, Criterion};
use std::hint::black_box;

const BINS: usize = 16384;

fn gaussian_like_space() -> OutputSpace {
    let grid = continuous_grid(-3.09, 3.09, 5, BINS).unwrap();
    // A smooth CDF stand-in: the logistic function; the bench measures our work, not SciPy's.
    let cdf: Vec<f64> = grid
        .edges
        .iter()
        .map(|x| 1.0 / (1.0 + (-1.7 * x).exp()))
        .collect();
    OutputSpace::continuous(&grid, &cdf, 5).unwrap()
}

fn char_ids(space: &OutputSpace) -> (Vec<usize>, Vec<u32>) {
    let mut offsets = vec![0];
    let mut ids = Vec::new();
    for v in space.values() {
        ids.extend(v.bytes().map(u32::from));
        ids.push(0); // terminator
        offsets.push(ids.len());
    }
    (offsets, ids)
}

fn benches(c: &mut Criterion) {
    c.bench_function("output_space_16384", |b| {
        b.iter(|| black_box(gaussian_like_space()))
    });
    let space = gaussian_like_space();
    let (offsets, ids) = char_ids(&space);
    c.bench_function("trie_build_16384", |b| {
        b.iter(|| black_box(Trie::build(&offsets, &ids, &space.probs).unwrap()))
    });
    let trie = Trie::build(&offsets, &ids, &space.probs).unwrap();
    let path = trie.value_path(BINS / 2);
    c.bench_function("targets_along_path", |b| {
        b.iter(|| black_box(trie.targets_along(&path).unwrap()))
    });
}

criterion_group!(data_path, benches);
criterion_main!(data_path);

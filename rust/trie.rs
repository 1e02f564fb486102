//! Prefix tries over tokenized canonical strings, stored as CSR arrays (docs/method.md §5).
//!
//! Nodes are numbered breadth-first and each node's children are contiguous and sorted by token,
//! so edge `e` (in CSR order) always leads to node `e + 1`: the child-node column is implicit and
//! the whole trie is three flat arrays.

use crate::error::{invalid, CoreError, Result};
use crate::rng::SplitMix64;

#[derive(Clone, Debug)]
pub struct Trie {
    /// Children of node `u` are edges `offsets[u]..offsets[u + 1]`.
    offsets: Vec<u32>,
    tokens: Vec<u32>,
    /// q(token | node): each node's outgoing probabilities sum to 1.
    probs: Vec<f64>,
    value_leaf: Vec<u32>,
}

/// Sparse next-token targets along one path: position `k` owns entries `offsets[k]..offsets[k+1]`.
/// What a tree-attention pass needs of a trie's shape, derived in one walk (see `Trie::layout`).
pub struct Layout {
    /// Every node in depth-first pre-order, children in edge order: a node's ancestors come
    /// before it and every subtree is contiguous.
    pub preorder: Vec<u32>,
    /// Each node's parent; the root has none (-1).
    pub parent: Vec<i64>,
    /// Each node's depth (root 0).
    pub depth: Vec<u32>,
    /// Value `i`'s path takes edges `value_edges[value_offsets[i]..value_offsets[i + 1]]`, root
    /// side first (the edge into node `u` is `u - 1`).
    pub value_offsets: Vec<usize>,
    pub value_edges: Vec<u32>,
}

pub struct PathTargets {
    pub offsets: Vec<usize>,
    pub tokens: Vec<u32>,
    pub probs: Vec<f64>,
}

impl Trie {
    /// Builds the trie of `masses.len()` token sequences, sequence `i` being
    /// `ids[offsets[i]..offsets[i + 1]]`. Sequences must be non-empty and prefix-free (each ends
    /// with the terminator); identical sequences share a leaf.
    pub fn build(offsets: &[usize], ids: &[u32], masses: &[f64]) -> Result<Self> {
        let m = masses.len();
        if m == 0 || offsets.len() != m + 1 || offsets[m] != ids.len() {
            return Err(invalid(
                "offsets",
                format!("need {} offsets ending at {}", m + 1, ids.len()),
            ));
        }
        if masses.iter().any(|x| !(x.is_finite() && *x >= 0.0)) {
            return Err(invalid("masses", "masses must be finite and non-negative"));
        }
        let seq = |i: u32| &ids[offsets[i as usize]..offsets[i as usize + 1]];
        if (0..m as u32).any(|i| seq(i).is_empty()) {
            return Err(invalid("ids", "every value needs at least one token"));
        }
        let mut order: Vec<u32> = (0..m as u32).collect();
        order.sort_unstable_by(|&a, &b| seq(a).cmp(seq(b)));

        let mut trie = Trie {
            offsets: vec![0],
            tokens: Vec::with_capacity(ids.len()),
            probs: Vec::with_capacity(ids.len()),
            value_leaf: vec![0; m],
        };
        // Breadth-first queue of (range in `order`, depth, mass); queue index == node id.
        let mut queue: Vec<(u32, u32, u32, f64)> = vec![(0, m as u32, 0, masses.iter().sum())];
        let mut head = 0;
        while head < queue.len() {
            let (a, b, depth, node_mass) = queue[head];
            let node = head as u32;
            head += 1;
            let d = depth as usize;
            let ended = |k: u32| seq(order[k as usize]).len() == d;
            if ended(b - 1) {
                // Sorted order puts longer sequences last: the whole range ends here.
                for k in a..b {
                    trie.value_leaf[order[k as usize] as usize] = node;
                }
            } else if ended(a) {
                return Err(invalid(
                    "ids",
                    "a value's tokens are a prefix of another's; append a terminator",
                ));
            } else {
                let first_edge = trie.tokens.len();
                let mut k = a;
                while k < b {
                    let token = seq(order[k as usize])[d];
                    let (start, mut mass) = (k, 0.0);
                    while k < b && seq(order[k as usize])[d] == token {
                        mass += masses[order[k as usize] as usize];
                        k += 1;
                    }
                    trie.tokens.push(token);
                    trie.probs.push(mass);
                    queue.push((start, k, depth + 1, mass));
                }
                let children = &mut trie.probs[first_edge..];
                // A massless subtree still needs a distribution: spread it evenly.
                let (scale, floor) = if node_mass > 0.0 {
                    (1.0 / node_mass, 0.0)
                } else {
                    (0.0, 1.0 / children.len() as f64)
                };
                children.iter_mut().for_each(|q| *q = *q * scale + floor);
            }
            trie.offsets.push(
                u32::try_from(trie.tokens.len())
                    .map_err(|_| invalid("ids", "trie exceeds 2^32 edges"))?,
            );
        }
        // Capacities were sized for the worst case (no shared prefixes); give the slack back.
        trie.tokens.shrink_to_fit();
        trie.probs.shrink_to_fit();
        trie.offsets.shrink_to_fit();
        Ok(trie)
    }

    pub fn num_nodes(&self) -> usize {
        self.offsets.len() - 1
    }

    pub fn num_values(&self) -> usize {
        self.value_leaf.len()
    }

    pub fn offsets(&self) -> &[u32] {
        &self.offsets
    }

    pub fn tokens(&self) -> &[u32] {
        &self.tokens
    }

    pub fn probs(&self) -> &[f64] {
        &self.probs
    }

    /// Each value's mass: the product of q along its path (values sharing a token sequence
    /// split their leaf's mass evenly).
    pub fn value_mass(&self) -> Vec<f64> {
        let mut node_mass = vec![0.0; self.num_nodes()];
        node_mass[0] = 1.0;
        for u in 0..self.num_nodes() as u32 {
            for e in self.children(u) {
                node_mass[e + 1] = node_mass[u as usize] * self.probs[e];
            }
        }
        let mut sharing = vec![0u32; self.num_nodes()];
        self.value_leaf
            .iter()
            .for_each(|&leaf| sharing[leaf as usize] += 1);
        self.value_leaf
            .iter()
            .map(|&leaf| node_mass[leaf as usize] / sharing[leaf as usize] as f64)
            .collect()
    }

    /// Heap bytes held by the trie (for memory reports).
    pub fn nbytes(&self) -> usize {
        4 * (self.offsets.len() + self.tokens.len() + self.value_leaf.len()) + 8 * self.probs.len()
    }

    fn children(&self, node: u32) -> std::ops::Range<usize> {
        self.offsets[node as usize] as usize..self.offsets[node as usize + 1] as usize
    }

    /// The child of `node` along `token`, if any.
    pub fn child(&self, node: u32, token: u32) -> Option<u32> {
        let range = self.children(node);
        let base = range.start;
        self.tokens[range]
            .binary_search(&token)
            .ok()
            .map(|i| (base + i + 1) as u32)
    }

    /// Parent of every node (the root is its own parent).
    pub fn parents(&self) -> Vec<u32> {
        let mut parent = vec![0u32; self.num_nodes()];
        for u in 0..self.num_nodes() as u32 {
            for e in self.children(u) {
                parent[e + 1] = u;
            }
        }
        parent
    }

    /// Depth of every node (root 0); with BFS numbering parents precede children.
    pub fn depths(&self) -> Vec<u32> {
        let mut depth = vec![0u32; self.num_nodes()];
        for u in 0..self.num_nodes() as u32 {
            for e in self.children(u) {
                depth[e + 1] = depth[u as usize] + 1;
            }
        }
        depth
    }

    /// Pre-order, parents, depths and every value's edges in one pass over the trie.
    pub fn layout(&self) -> Layout {
        let n = self.num_nodes();
        let mut parent = vec![-1i64; n];
        let mut depth = vec![0u32; n];
        // Breadth-first numbering: a parent's depth is set before its children are reached.
        for u in 0..n as u32 {
            for e in self.children(u) {
                parent[e + 1] = i64::from(u);
                depth[e + 1] = depth[u as usize] + 1;
            }
        }
        let mut preorder = Vec::with_capacity(n);
        let mut stack = vec![0u32];
        while let Some(u) = stack.pop() {
            preorder.push(u);
            // Pushed last-first so the first child is visited next.
            stack.extend(self.children(u).rev().map(|e| e as u32 + 1));
        }
        let mut value_offsets = Vec::with_capacity(self.num_values() + 1);
        value_offsets.push(0);
        let mut value_edges = Vec::new();
        for &leaf in &self.value_leaf {
            let start = value_edges.len();
            let mut node = leaf;
            while node != 0 {
                value_edges.push(node - 1);
                node = parent[node as usize] as u32;
            }
            value_edges[start..].reverse();
            value_offsets.push(value_edges.len());
        }
        Layout {
            preorder,
            parent,
            depth,
            value_offsets,
            value_edges,
        }
    }

    /// Token ids of value `i` (terminator included), read back from the trie.
    pub fn value_path(&self, i: usize) -> Vec<u32> {
        let mut node = self.value_leaf[i] as usize;
        let mut path = Vec::new();
        while node != 0 {
            let edge = node - 1;
            path.push(self.tokens[edge]);
            node = self.offsets.partition_point(|&o| o as usize <= edge) - 1;
        }
        path.reverse();
        path
    }

    /// `n` value indices drawn i.i.d. from the target masses, reproducible from `seed`.
    pub fn sample_values(&self, n: usize, seed: u64) -> Vec<usize> {
        let masses = self.value_mass();
        let mut cumulative = Vec::with_capacity(masses.len());
        let mut total = 0.0;
        for m in &masses {
            total += m;
            cumulative.push(total);
        }
        let mut rng = SplitMix64::new(seed);
        (0..n)
            .map(|_| {
                let u = rng.next_f64() * total;
                // First value whose cumulative mass exceeds u: zero-mass values are never drawn.
                cumulative
                    .partition_point(|&c| c <= u)
                    .min(cumulative.len() - 1)
            })
            .collect()
    }

    /// Targets q(·|p_k) at every position of a path of token ids starting at the root.
    pub fn targets_along(&self, path: &[u32]) -> Result<PathTargets> {
        let mut out = PathTargets {
            offsets: vec![0],
            tokens: Vec::new(),
            probs: Vec::new(),
        };
        let mut node = 0u32;
        for (position, &token) in path.iter().enumerate() {
            let range = self.children(node);
            out.tokens.extend_from_slice(&self.tokens[range.clone()]);
            out.probs.extend_from_slice(&self.probs[range]);
            out.offsets.push(out.tokens.len());
            node = self
                .child(node, token)
                .ok_or(CoreError::PathNotInTrie { position, token })?;
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn toy() -> Trie {
        // "1","2" then end token 9; values "1" (0.5), "12" (0.25), "2" (0.25)
        let ids = [1, 9, 1, 2, 9, 2, 9];
        Trie::build(&[0, 2, 5, 7], &ids, &[0.5, 0.25, 0.25]).unwrap()
    }

    #[test]
    fn children_probabilities_sum_to_one_and_paths_multiply_to_masses() {
        let t = toy();
        for u in 0..t.num_nodes() as u32 {
            let r = t.children(u);
            if !r.is_empty() {
                assert!((t.probs[r].iter().sum::<f64>() - 1.0).abs() < 1e-12);
            }
        }
        for i in 0..3 {
            let path = t.value_path(i);
            let targets = t.targets_along(&path).unwrap();
            let mut p = 1.0;
            for (k, tok) in path.iter().enumerate() {
                let r = targets.offsets[k]..targets.offsets[k + 1];
                let j = targets.tokens[r.clone()]
                    .iter()
                    .position(|x| x == tok)
                    .unwrap();
                p *= targets.probs[r][j];
            }
            assert!((p - [0.5, 0.25, 0.25][i]).abs() < 1e-12);
        }
        assert_eq!(t.value_path(1), vec![1, 2, 9]);
    }

    #[test]
    fn root_targets_follow_the_masses() {
        let t = toy();
        let targets = t.targets_along(&[1, 9]).unwrap();
        assert_eq!(targets.offsets, vec![0, 2, 4]);
        assert_eq!(&targets.tokens[..2], &[1, 2]);
        assert_eq!(&targets.probs[..2], &[0.75, 0.25]);
        assert!(t.targets_along(&[3]).is_err());
    }

    #[test]
    fn layout_walks_depth_first_and_follows_value_paths() {
        let t = toy();
        // BFS numbering, children by token: root 0; "1" -> 1, "2" -> 2; under 1: "2" -> 3,
        // end -> 4; under 2: end -> 5; under 3: end -> 6.
        let layout = t.layout();
        assert_eq!(layout.preorder, vec![0, 1, 3, 6, 4, 2, 5]);
        assert_eq!(layout.parent, vec![-1, 0, 0, 1, 1, 2, 3]);
        assert_eq!(layout.depth, vec![0, 1, 1, 2, 2, 2, 3]);
        assert_eq!(layout.value_offsets, vec![0, 2, 5, 7]);
        assert_eq!(layout.value_edges, vec![0, 3, 0, 2, 5, 1, 4]);
        for i in 0..t.num_values() {
            let edges = &layout.value_edges[layout.value_offsets[i]..layout.value_offsets[i + 1]];
            let tokens: Vec<u32> = edges.iter().map(|&e| t.tokens[e as usize]).collect();
            assert_eq!(tokens, t.value_path(i));
        }
    }

    #[test]
    fn prefix_sequences_are_rejected() {
        assert!(Trie::build(&[0, 1, 3], &[1, 1, 2], &[0.5, 0.5]).is_err());
    }

    #[test]
    fn sampling_is_seeded_and_follows_masses() {
        let t = toy();
        let a = t.sample_values(20000, 7);
        assert_eq!(a, t.sample_values(20000, 7));
        let share = a.iter().filter(|&&i| i == 0).count() as f64 / a.len() as f64;
        assert!((share - 0.5).abs() < 0.02);
    }
}

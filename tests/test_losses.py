import math

import numpy as np
import pytest
import torch

from calibft.losses import (
    MAX_CPU_CHUNK_ROWS,
    MIN_CHUNK_ELEMENTS,
    MIN_CPU_CHUNK_ROWS,
    SparseTargets,
    default_chunk_size,
    dense_sparse_kl,
    example_weights,
    fused_sparse_kl,
    sparse_kl_per_position,
)


def random_targets(
    num_positions: int, vocab: int, gen: torch.Generator, max_children: int = 5
) -> SparseTargets:
    parts = []
    for _ in range(num_positions):
        k = int(torch.randint(1, max_children + 1, (1,), generator=gen))
        tokens = torch.randperm(vocab, generator=gen)[:k].numpy()
        probs = torch.rand(k, generator=gen, dtype=torch.float64).numpy()
        probs[0] = 0.0  # a zero-mass child exercises the 1e-8 floor
        probs = probs / probs.sum() if probs.sum() > 0 else np.ones(k) / k
        parts.append((np.array([0, k]), tokens.astype(np.int32), probs))
    return SparseTargets.from_csr(parts)


def case(dtype=torch.float32, positions=13, vocab=37, hidden_size=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(positions, hidden_size, generator=gen, dtype=dtype)
    weight = torch.randn(vocab, hidden_size, generator=gen, dtype=dtype)
    bias = torch.randn(vocab, generator=gen, dtype=dtype)
    targets = random_targets(positions, vocab, gen)
    lengths = [positions // 3, 1, positions - positions // 3 - 1]  # uneven examples
    return hidden, weight, bias, targets, example_weights(lengths).to(dtype)


def capped(logits, softcap):
    """Gemma 2's final-logit soft-capping (None: logits unchanged)."""
    return logits if softcap is None else softcap * torch.tanh(logits / softcap)


@pytest.mark.parametrize("softcap", [None, 2.0])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("chunk", [None, 1, 4, 100])
def test_value_and_grads_equal_dense(temperature, chunk, softcap):
    hidden, weight, bias, targets, w = case()
    dense_inputs = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
    fused_inputs = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
    h, W, b = dense_inputs
    expected = dense_sparse_kl(capped(h @ W.T + b, softcap), targets, w, temperature=temperature)
    expected.backward()
    h2, W2, b2 = fused_inputs
    got = fused_sparse_kl(
        h2, W2, targets, w, bias=b2, softcap=softcap, temperature=temperature, chunk_size=chunk
    )
    got.backward()
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    for a, e in zip(fused_inputs, dense_inputs):
        torch.testing.assert_close(a.grad, e.grad, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("softcap", [None, 1.5])
def test_gradcheck_float64(softcap):
    hidden, weight, bias, targets, w = case(torch.float64, positions=6, vocab=11, hidden_size=4)
    targets = targets.to("cpu", torch.float64)
    inputs = tuple(t.clone().requires_grad_() for t in (hidden, weight, bias))

    def fn(h, W, b):
        return fused_sparse_kl(h, W, targets, w, bias=b, softcap=softcap, chunk_size=4)

    assert torch.autograd.gradcheck(fn, inputs)


def test_frozen_head_gets_no_gradient_and_hidden_grad_unchanged():
    hidden, weight, _, targets, w = case()
    h1 = hidden.clone().requires_grad_()
    fused_sparse_kl(h1, weight, targets, w).backward()
    h2, W2 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    fused_sparse_kl(h2, W2, targets, w).backward()
    assert weight.grad is None
    torch.testing.assert_close(h1.grad, h2.grad)


def test_kl_is_zero_when_model_matches_target():
    # One hidden unit per token: logits = log q on the support and -inf-like elsewhere.
    vocab = 6
    probs = np.array([0.2, 0.3, 0.5])
    targets = SparseTargets.from_csr(
        [(np.array([0, 3]), np.array([1, 2, 4], dtype=np.int32), probs)]
    )
    logits = torch.full((1, vocab), -60.0, dtype=torch.float64)
    logits[0, [1, 2, 4]] = torch.from_numpy(np.log(probs))
    kl = sparse_kl_per_position(logits, torch.eye(vocab, dtype=torch.float64), targets)
    assert abs(float(kl[0])) < 1e-12


def test_full_vocab_normalizer_penalizes_mass_outside_children():
    # Uniform logits: the children's relative probabilities are right but most mass lies outside.
    targets = SparseTargets.from_csr(
        [(np.array([0, 2]), np.array([0, 1], dtype=np.int32), np.array([0.5, 0.5]))]
    )
    vocab = 10
    kl = sparse_kl_per_position(torch.zeros(1, vocab), torch.eye(vocab), targets)
    assert float(kl[0]) == pytest.approx(np.log(vocab / 2), rel=1e-6)


def test_one_hot_targets_give_cross_entropy():
    gen = torch.Generator().manual_seed(3)
    hidden = torch.randn(9, 8, generator=gen, requires_grad=True)
    weight = torch.randn(21, 8, generator=gen)
    labels = torch.randint(0, 21, (9,), generator=gen)
    w = example_weights([4, 5])
    got = fused_sparse_kl(hidden, weight, SparseTargets.one_hot(labels), w.float())
    ref_hidden = hidden.detach().clone().requires_grad_()
    per_token = torch.nn.functional.cross_entropy(ref_hidden @ weight.T, labels, reduction="none")
    expected = per_token[:4].mean() / 2 + per_token[4:].mean() / 2
    torch.testing.assert_close(got, expected)
    got.backward()
    expected.backward()
    torch.testing.assert_close(hidden.grad, ref_hidden.grad)


def test_example_weights_average_per_example_then_batch():
    w = example_weights([1, 3])
    assert w.tolist() == pytest.approx([0.5, 1 / 6, 1 / 6, 1 / 6])
    assert example_weights([1, 3], token_mean=True).tolist() == pytest.approx([0.25] * 4)
    with pytest.raises(ValueError, match="at least one supervised position"):
        example_weights([2, 0])


def test_from_csr_concatenates_paths():
    a = (np.array([0, 2, 3]), np.array([5, 6, 7], dtype=np.int32), np.array([0.5, 0.5, 1.0]))
    b = (np.array([0, 1]), np.array([9], dtype=np.int32), np.array([1.0]))
    t = SparseTargets.from_csr([a, b])
    assert t.offsets.tolist() == [0, 2, 3, 4]
    assert t.tokens.tolist() == [5, 6, 7, 9]


def test_shape_errors_are_value_errors():
    hidden, weight, _, targets, w = case()
    with pytest.raises(ValueError, match="target positions"):
        fused_sparse_kl(hidden[:-1], weight, targets, w[:-1])
    with pytest.raises(ValueError, match="temperature"):
        fused_sparse_kl(hidden, weight, targets, w, temperature=0.0)
    with pytest.raises(ValueError, match="softcap"):
        fused_sparse_kl(hidden, weight, targets, w, softcap=0.0)


def test_default_chunk_size_rules():
    # GPU: one chunk's logits about the size of the hidden states, at least MIN_CHUNK_ELEMENTS
    assert default_chunk_size(4096, 151936, 1024) == max(28, MIN_CHUNK_ELEMENTS // 151936) == 55
    assert default_chunk_size(100_000, 49152, 576) == math.ceil(100_000 * 576 / 49152)
    # CPU: a quarter of the positions within MIN_CPU_CHUNK_ROWS..MAX_CPU_CHUNK_ROWS, never more
    # rows than positions
    assert default_chunk_size(512, 151936, 1024, cpu=True) == MIN_CPU_CHUNK_ROWS
    assert default_chunk_size(1536, 49152, 576, cpu=True) == 384
    assert default_chunk_size(4096, 151936, 1024, cpu=True) == MAX_CPU_CHUNK_ROWS
    assert default_chunk_size(100, 151936, 1024, cpu=True) == 100
    assert default_chunk_size(1, 151936, 1024) == 1

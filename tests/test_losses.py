import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import calibft.losses as losses
from calibft.losses import (
    CHUNK_BUDGET_BYTES,
    LOGIT_BYTES,
    MAX_CPU_CHUNK_ROWS,
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
    # GPU: as many rows as fit the logits budget (341 at Gemma 3's vocabulary), never more rows than
    # positions
    assert default_chunk_size(4096, 262144) == CHUNK_BUDGET_BYTES // (LOGIT_BYTES * 262144) == 341
    assert default_chunk_size(100_000, 49152) == CHUNK_BUDGET_BYTES // (LOGIT_BYTES * 49152)
    assert default_chunk_size(100, 49152) == 100
    # CPU: a quarter of the positions within MIN_CPU_CHUNK_ROWS..MAX_CPU_CHUNK_ROWS, within the
    # budget too
    assert default_chunk_size(512, 151936, cpu=True) == MIN_CPU_CHUNK_ROWS
    assert default_chunk_size(1536, 49152, cpu=True) == 384
    assert default_chunk_size(4096, 151936, cpu=True) == MAX_CPU_CHUNK_ROWS
    assert default_chunk_size(4096, 1 << 20, cpu=True) == CHUNK_BUDGET_BYTES // (LOGIT_BYTES << 20)
    assert default_chunk_size(100, 151936, cpu=True) == 100
    assert default_chunk_size(1, 151936) == 1


class _CountCasts(TorchDispatchMode):
    """Counts dtype conversions of tensors of one shape (the LM head's)."""

    def __init__(self, shape):
        super().__init__()
        self.shape, self.count = tuple(shape), 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._to_copy.default and tuple(args[0].shape) == self.shape:
            self.count += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("softcap", [None, 2.0])
def test_autocast_casts_the_head_once_and_equals_dense(softcap):
    """Under bf16 autocast over float32 weights (mixed_precision=bf16 on a float32 base), the fused
    loss casts the head once per call however many chunks it takes, and equals the dense loss on
    the same bf16 products (the model's own forward under autocast)."""
    hidden, weight, bias, targets, w = case(positions=40, vocab=64, hidden_size=16)
    h_fused = hidden.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16), _CountCasts(weight.shape) as casts:
        got = fused_sparse_kl(h_fused, weight, targets, w, bias=bias, softcap=softcap, chunk_size=3)
    assert casts.count == 1  # 14 chunks, one cast
    assert got.dtype == torch.float32  # the loss is not rounded to bf16
    got.backward()
    h_dense = hidden.clone().requires_grad_()
    logits = h_dense.bfloat16() @ weight.bfloat16().T
    expected = dense_sparse_kl(capped(logits.float() + bias, softcap), targets, w)
    expected.backward()
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(h_fused.grad, h_dense.grad, atol=2e-3, rtol=2e-2)


def test_budget_chunking_equals_dense(monkeypatch):
    """Chunks sized by the memory budget (here shrunk to force 5-row chunks) give the dense loss."""
    hidden, weight, bias, targets, w = case(positions=23, vocab=64, hidden_size=8)
    monkeypatch.setattr(losses, "CHUNK_BUDGET_BYTES", 5 * LOGIT_BYTES * 64)
    assert losses.default_chunk_size(23, 64) == 5
    h1, h2 = hidden.clone().requires_grad_(), hidden.clone().requires_grad_()
    got = fused_sparse_kl(h1, weight, targets, w, bias=bias)
    got.backward()
    expected = dense_sparse_kl(h2 @ weight.T + bias, targets, w)
    expected.backward()
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(h1.grad, h2.grad, atol=1e-6, rtol=1e-4)

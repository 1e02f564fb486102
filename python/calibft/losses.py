"""Training losses over sparse next-token targets, fused with the LM head (docs/method.md §6).

Both objectives are one computation: a per-position KL divergence between a sparse target
distribution q (a trie node's children, or a one-hot label for cross-entropy) and the model's
softmax over the full vocabulary, weighted per position. The fused kernel takes the hidden states
at the supervised positions and the LM head (weight, bias and the model's logit soft-cap, see
`calibft.lm.decode.logit_head`), walks the positions in chunks, and never holds more than one
chunk of full-vocabulary logits: the logsumexp covers the vocabulary, only the target tokens'
logits are gathered, and the gradient ``softmax(z/τ) - q`` is formed per chunk during the forward
pass (the backward pass only rescales it).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from packaging.version import Version
from torch import Tensor

TARGET_FLOOR = 1e-8
"""Target probabilities are floored at this value and renormalized before the log
(docs/method.md §6)."""


@dataclass(frozen=True)
class SparseTargets:
    """Sparse next-token target distributions of P positions in CSR form.

    Position p's targets are ``tokens[offsets[p]:offsets[p+1]]`` with probabilities
    ``probs[offsets[p]:offsets[p+1]]``. ``offsets`` stays on the CPU: chunk boundaries are read
    from it without a device synchronization.
    """

    offsets: Tensor  # int64 [P+1], CPU
    tokens: Tensor  # int64 [E]
    probs: Tensor  # float [E]
    # Optional float [P]: mass on every token not listed, one "other" bucket per position; the
    # listed probabilities then sum to 1 - rest (docs/method.md §9).
    rest: Tensor | None = None

    @property
    def num_positions(self) -> int:
        return self.offsets.numel() - 1

    @classmethod
    def from_csr(cls, parts: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> SparseTargets:
        """Concatenate per-path CSR triples ``(offsets, tokens, probs)`` (e.g.
        ``Trie.targets_along``)."""
        if not parts:
            raise ValueError(
                "SparseTargets.from_csr needs at least one (offsets, tokens, probs) triple"
            )
        offsets = [np.zeros(1, dtype=np.int64)]
        base = 0
        for off, _, _ in parts:
            off = np.asarray(off, dtype=np.int64)
            offsets.append(off[1:] - off[0] + base)
            base += int(off[-1] - off[0])
        tokens = np.concatenate([np.asarray(t)[o[0] : o[-1]] for o, t, _ in parts])
        probs = np.concatenate([np.asarray(q)[o[0] : o[-1]] for o, _, q in parts])
        return cls(
            offsets=torch.from_numpy(np.concatenate(offsets)),
            tokens=torch.from_numpy(tokens.astype(np.int64)),
            probs=torch.from_numpy(probs.astype(np.float64)),
        )

    @classmethod
    def one_hot(cls, labels: Tensor) -> SparseTargets:
        """Targets that put all mass on ``labels[p]``: the KL then equals the cross-entropy."""
        labels = labels.reshape(-1).long()
        return cls(
            offsets=torch.arange(labels.numel() + 1, dtype=torch.int64),
            tokens=labels,
            probs=torch.ones(labels.numel(), dtype=torch.float32, device=labels.device),
        )

    def to(self, device: torch.device | str, dtype: torch.dtype = torch.float32) -> SparseTargets:
        """Move tokens and probabilities to ``device`` (offsets stay on the CPU)."""
        return SparseTargets(
            offsets=self.offsets.cpu(),
            tokens=self.tokens.to(device, non_blocking=True),
            probs=self.probs.to(device, dtype, non_blocking=True),
            rest=None if self.rest is None else self.rest.to(device, dtype, non_blocking=True),
        )


def example_weights(lengths: Sequence[int] | Tensor, *, token_mean: bool = False) -> Tensor:
    """Per-position weights for a batch whose examples have ``lengths`` supervised positions.

    Default (docs/method.md §6, the paper's formula): the mean over examples of the mean over each
    example's positions, i.e. weight ``1 / (n_examples * length_i)``. ``token_mean`` instead weights
    every position of the batch equally (what the authors' code did for the hard target).
    """
    lengths = torch.as_tensor(lengths, dtype=torch.int64)
    if lengths.numel() == 0 or bool((lengths <= 0).any()):
        raise ValueError(
            f"every example needs at least one supervised position, got lengths {lengths.tolist()}"
        )
    if token_mean:
        per_example = torch.full(lengths.shape, 1.0 / float(lengths.sum()), dtype=torch.float64)
    else:
        per_example = 1.0 / (lengths.double() * lengths.numel())
    return torch.repeat_interleave(per_example, lengths)


# Bytes one chunk holds per logits element at its peak: the head's product (up to 4 bytes), its
# float32 working copy and, for a soft-capped head, the float32 slope kept for the chain rule.
LOGIT_BYTES = 12
# Logits memory one chunk may take on a GPU: thin chunks re-read the whole LM head per chunk and
# become memory-bound; 1 GiB is ~340 rows at Gemma 3's 262k vocabulary, ~2700 at 32k.
CHUNK_BUDGET_BYTES = 1 << 30

# On a CPU every chunk's two products re-read the whole LM head from memory: thinner than ~256
# rows, that re-read and not arithmetic sets the pace; 512 rows reach the bare matrix products'
# speed (BENCHMARKS.md §3). A chunk stays within a quarter of the positions above the minimum.
MIN_CPU_CHUNK_ROWS = 256
MAX_CPU_CHUNK_ROWS = 512


def default_chunk_size(num_positions: int, vocab_size: int, *, cpu: bool = False) -> int:
    """Positions per chunk: as many as fit CHUNK_BUDGET_BYTES of logits buffers; on a CPU also a
    quarter of the positions within MIN_CPU_CHUNK_ROWS..MAX_CPU_CHUNK_ROWS."""
    rows = CHUNK_BUDGET_BYTES // (LOGIT_BYTES * vocab_size)
    if cpu:
        rows = min(rows, max(MIN_CPU_CHUNK_ROWS, min(MAX_CPU_CHUNK_ROWS, num_positions // 4)))
    return max(1, min(num_positions, rows))


def _matmul_dtype(hidden: Tensor, weight: Tensor) -> torch.dtype:
    """The dtype the head's products run in: autocast's where it is on (as the model's own forward
    would), else the wider of the two inputs."""
    device = hidden.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return torch.promote_types(hidden.dtype, weight.dtype)


# torch.mm's out_dtype (float32 output from bf16/fp16 inputs, CUDA only) exists from torch 2.8.
_MM_OUT_DTYPE = Version(torch.__version__).release >= (2, 8)


def _logits(h: Tensor, weight_t: Tensor, bias: Tensor | None, compute: torch.dtype) -> Tensor:
    """One chunk's logits in ``compute`` precision, a fresh buffer the caller may modify in place.
    On CUDA a low-precision product accumulates into float32 directly, so logits are not rounded
    to bfloat16 on the way (CPU kernels have no such output dtype)."""
    if _MM_OUT_DTYPE and h.device.type == "cuda" and h.dtype in (torch.bfloat16, torch.float16):
        z = torch.mm(h, weight_t, out_dtype=compute)
    else:
        z = (h @ weight_t).to(compute)
    return z if bias is None else z.add_(bias)


def _floored_targets(
    targets: SparseTargets, rows: Tensor, num_positions: int, dtype: torch.dtype
) -> Tensor:
    """Floor target probabilities at TARGET_FLOOR and renormalize each position's children (to
    1 - rest where the targets have an "other" bucket)."""
    q = targets.probs.to(rows.device, dtype).clamp_min(TARGET_FLOOR)
    totals = torch.zeros(num_positions, dtype=dtype, device=q.device).index_add_(0, rows, q)
    if targets.rest is not None:
        totals = totals / (1 - targets.rest.to(rows.device, dtype))
    return q / totals[rows]


def _fused_pass(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    softcap: float | None,
    targets: SparseTargets,
    position_weights: Tensor | None,
    temperature: float,
    chunk_size: int | None,
    grads: tuple[bool, bool, bool],
) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor | None]:
    """Per-position KL(q || softmax(z/τ)) and, where asked, gradients of Σ_p w_p KL_p, where
    z = h W^T + b, soft-capped to ``softcap * tanh(z / softcap)`` when ``softcap`` is set.

    Returns ``(kl [P], grad_hidden, grad_weight, grad_bias)``; gradients are None unless the
    matching flag in ``grads`` is set (they then need ``position_weights``).
    """
    num_positions = hidden.shape[0]
    vocab_size = weight.shape[0]
    device = hidden.device
    compute = torch.promote_types(hidden.dtype, torch.float32)
    # The head (and the hidden states) are cast once per call, not once per chunk as autocast
    # would: the chunks below run with autocast off on these copies.
    mm_dtype = _matmul_dtype(hidden, weight)
    head, inputs = weight.to(mm_dtype), hidden.to(mm_dtype)
    head_t = head.T
    bias_c = None if bias is None else bias.to(compute)
    offsets = targets.offsets.cpu()
    num_entries = targets.tokens.numel()
    counts = (offsets[1:] - offsets[:-1]).to(device)
    # Position of every target entry; output_size avoids a device synchronization.
    rows = torch.repeat_interleave(
        torch.arange(num_positions, device=device), counts, output_size=num_entries
    )
    q = _floored_targets(targets, rows, num_positions, compute)
    tokens = targets.tokens.to(device)
    q_mass = torch.zeros(num_positions, dtype=compute, device=device).index_add_(0, rows, q)
    # The Σ q log q term needs no logits.
    kl = torch.zeros(num_positions, dtype=compute, device=device).index_add_(0, rows, q * q.log())
    rest = None if targets.rest is None else targets.rest.to(device, compute)
    if rest is not None:  # the "other" bucket: + r log r - r log(model's mass off the list)
        kl += torch.xlogy(rest, rest)

    want_h, want_w, want_b = grads
    grad_hidden = torch.empty_like(hidden) if want_h else None
    grad_weight = torch.zeros(weight.shape, dtype=compute, device=device) if want_w else None
    grad_bias = torch.zeros(vocab_size, dtype=compute, device=device) if want_b else None
    if any(grads):
        if position_weights is None:
            raise ValueError("position_weights are required to compute gradients")
        scale = position_weights.to(device, compute) / temperature

    step = chunk_size or default_chunk_size(num_positions, vocab_size, cpu=device.type == "cpu")
    with torch.autocast(device.type, enabled=False):
        for start in range(0, num_positions, step):
            stop = min(start + step, num_positions)
            lo, hi = int(offsets[start]), int(offsets[stop])
            h = inputs[start:stop]
            # The chunk's logits buffer is ours: every step below works in place on it.
            z = _logits(h, head_t, bias_c, compute)
            slope = None
            if softcap is not None:
                z.div_(softcap).tanh_()
                if any(grads):  # d(capped)/d(raw) = 1 - tanh², kept for the chain rule below
                    slope = 1.0 - z.square()
                z.mul_(softcap)
            if temperature != 1.0:
                z.div_(temperature)
            local_rows = rows[lo:hi] - start
            picked = z[local_rows, tokens[lo:hi]]
            # logsumexp by hand so that exp(z - max) is formed in place and reused for the softmax.
            peak = z.amax(dim=-1, keepdim=True)
            total = z.sub_(peak).exp_().sum(dim=-1, keepdim=True)
            lse = (peak + total.log()).squeeze(-1)
            kl[start:stop] += q_mass[start:stop] * lse
            kl[start:stop].index_add_(0, local_rows, -q[lo:hi] * picked)
            row_mass = q_mass[start:stop]
            if rest is not None:
                # The model's mass off the list, T, summed over those tokens (not 1 - listed,
                # which cancels when the list holds nearly everything).
                listed = (local_rows, tokens[lo:hi])
                exp_listed = z[listed]
                z.index_put_(listed, torch.zeros_like(exp_listed))
                tail = (z.sum(dim=-1) / total.squeeze(-1)).clamp_min(torch.finfo(compute).tiny)
                z.index_put_(listed, exp_listed)
                kl[start:stop] -= rest[start:stop] * tail.log()
                # d(-r log T)/dz_j = r s_j (1[j listed] - 1) / T: the whole row gets 1 - r/T
                # instead of q_mass, the listed tokens get r s_j / T back.
                ratio = rest[start:stop] / tail
                row_mass = 1 - ratio
            if any(grads):
                # d KL_p / d z_p = (q_mass_p softmax(z_p/τ) - q_p) / τ, built in z's buffer.
                z.mul_((row_mass * scale[start:stop])[:, None] / total)
                listed_grad = -q[lo:hi]
                if rest is not None:
                    back = ratio[local_rows] * exp_listed / total[local_rows, 0]
                    listed_grad = listed_grad + back
                z.index_put_(
                    (local_rows, tokens[lo:hi]),
                    listed_grad * scale[start:stop][local_rows],
                    accumulate=True,
                )
                if slope is not None:
                    z.mul_(slope)
                if grad_hidden is not None:
                    grad_hidden[start:stop] = z.to(mm_dtype) @ head
                if grad_weight is not None:
                    grad_weight.addmm_(z.T, h.to(compute))
                if grad_bias is not None:
                    grad_bias += z.sum(0)
            del z, slope  # free this chunk's logits before the next chunk allocates its own
    if grad_weight is not None:
        grad_weight = grad_weight.to(weight.dtype)
    if grad_bias is not None:
        grad_bias = grad_bias.to(bias.dtype)  # type: ignore[union-attr]
    return kl, grad_hidden, grad_weight, grad_bias


class _FusedSparseKL(torch.autograd.Function):
    """Σ_p w_p KL(q_p || softmax(cap(h_p W^T + b))/τ) with gradients formed during the forward
    pass (cap: the optional soft-cap)."""

    @staticmethod
    def forward(
        ctx,
        hidden: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        softcap: float | None,
        offsets: Tensor,
        tokens: Tensor,
        probs: Tensor,
        rest: Tensor | None,
        position_weights: Tensor,
        temperature: float,
        chunk_size: int | None,
    ) -> Tensor:
        targets = SparseTargets(offsets, tokens, probs, rest)
        grads = (
            ctx.needs_input_grad[0],
            ctx.needs_input_grad[1],
            bias is not None and ctx.needs_input_grad[2],
        )
        kl, g_h, g_w, g_b = _fused_pass(
            hidden, weight, bias, softcap, targets, position_weights, temperature, chunk_size, grads
        )
        ctx.save_for_backward(g_h, g_w, g_b)
        # float32 (or wider) whatever the model dtype: a bfloat16 loss would round the logged value.
        return (kl * position_weights.to(kl.device, kl.dtype)).sum()

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        g_h, g_w, g_b = ctx.saved_tensors
        scaled = [None if g is None else g * grad_output.to(g.dtype) for g in (g_h, g_w, g_b)]
        return (*scaled, None, None, None, None, None, None, None, None)


def fused_sparse_kl(
    hidden: Tensor,
    weight: Tensor,
    targets: SparseTargets,
    position_weights: Tensor,
    *,
    bias: Tensor | None = None,
    softcap: float | None = None,
    temperature: float = 1.0,
    chunk_size: int | None = None,
) -> Tensor:
    """Weighted sum over positions of KL(q_p || softmax(z_p / τ)), a scalar, where
    z_p = h_p W^T + b, or ``softcap * tanh((h_p W^T + b) / softcap)`` for a soft-capped model.

    ``hidden`` [P, H] holds the hidden states at the supervised positions only; ``weight`` [V, H]
    (and ``bias`` [V], ``softcap``) is the LM head (`calibft.lm.decode.logit_head`). With
    ``example_weights`` as ``position_weights`` this is the soft-target loss of docs/method.md §6.
    The LM-head gradient is computed only when ``weight`` requires it.
    """
    _check_shapes(hidden, weight, targets, temperature, softcap)
    if position_weights.shape != (targets.num_positions,):
        raise ValueError(
            f"position_weights must have shape ({targets.num_positions},), "
            f"got {tuple(position_weights.shape)}"
        )
    return _FusedSparseKL.apply(
        hidden,
        weight,
        bias,
        softcap,
        targets.offsets.cpu(),
        targets.tokens,
        targets.probs,
        targets.rest,
        position_weights,
        float(temperature),
        chunk_size,
    )


@torch.no_grad()
def sparse_kl_per_position(
    hidden: Tensor,
    weight: Tensor,
    targets: SparseTargets,
    *,
    bias: Tensor | None = None,
    softcap: float | None = None,
    temperature: float = 1.0,
    chunk_size: int | None = None,
) -> Tensor:
    """KL(q_p || softmax(z_p/τ)) of every position (z_p as in `fused_sparse_kl`), float32 or
    wider, without gradients (evaluation)."""
    _check_shapes(hidden, weight, targets, temperature, softcap)
    kl, _, _, _ = _fused_pass(
        hidden, weight, bias, softcap, targets, None, temperature, chunk_size, (False, False, False)
    )
    return kl


def dense_sparse_kl(
    logits: Tensor, targets: SparseTargets, position_weights: Tensor, *, temperature: float = 1.0
) -> Tensor:
    """Reference formula on materialized logits [P, V] (a full log-softmax in float32 or wider);
    for tests and benchmarks."""
    num_positions = logits.shape[0]
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    log_p = torch.log_softmax(logits / temperature, dim=-1)
    counts = targets.offsets[1:] - targets.offsets[:-1]
    rows = torch.repeat_interleave(torch.arange(num_positions), counts).to(logits.device)
    q = _floored_targets(targets, rows, num_positions, log_p.dtype)
    tokens = targets.tokens.to(logits.device)
    terms = q * (q.log() - log_p[rows, tokens])
    per_position = torch.zeros(num_positions, dtype=log_p.dtype, device=logits.device).index_add(
        0, rows, terms
    )
    if targets.rest is not None:
        rest = targets.rest.to(logits.device, log_p.dtype)
        off_list = log_p.index_put((rows, tokens), torch.tensor(-torch.inf, dtype=log_p.dtype))
        tail = torch.where(rest > 0, rest * off_list.logsumexp(-1), 0.0)  # nothing off the list
        per_position = per_position + torch.xlogy(rest, rest) - tail
    return (per_position * position_weights.to(per_position.dtype)).sum()


def _check_shapes(
    hidden: Tensor,
    weight: Tensor,
    targets: SparseTargets,
    temperature: float,
    softcap: float | None,
) -> None:
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"hidden must be [P, H] and weight [V, H]; got {tuple(hidden.shape)} and "
            f"{tuple(weight.shape)}"
        )
    if hidden.shape[0] != targets.num_positions:
        raise ValueError(
            f"{hidden.shape[0]} hidden states for {targets.num_positions} target positions"
        )
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if softcap is not None and not softcap > 0:
        raise ValueError(f"softcap must be > 0 (or None), got {softcap}")

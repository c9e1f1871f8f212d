"""Stochastic layer-wise shuffle (ShuffleMamba, arXiv 2408.17081), as a plug-in for any sequence backbone.

Per layer i of a depth-`n` stack the shuffle fires with probability
    linear:   p_i = rate * i / (n - 1)      (layer 0 never shuffles; the official default)
    constant: p_0 = 0, p_i = rate for i > 0 (the official commented-out alternative)
One Bernoulli draw per layer per forward (from the CPU RNG, so no device sync), one ``randperm(L)`` shared by
the whole batch, applied to the hidden states and the residual, and undone right after the layer. Every token
is permuted — cls token and registers included — so their read-out positions stay valid. Nothing happens in
eval mode. Indexing along the sequence dimension (``index_select``) is used instead of the official expanded
per-sample ``gather``: same result, no (B, L, D) index tensor.

Under ``torch.compile`` the host-side coin flip would break the graph (and a data-dependent branch cannot be traced),
so the traced forward is branch-free: the coin is drawn on the device and the permutation becomes
``where(fired, randperm(L), arange(L))``, an identity gather when the coin says no. Same distribution, one graph for
the whole model; ``fired`` then stays uncounted (counting would need a device sync). A model draws every layer's
coin and permutation (and its inverse) at once with ``plan = shuffle.plan(hidden)`` and passes ``plan`` to each call:
a handful of kernels per forward instead of a handful per layer (H200, shufflemamba_tiny training step with CUDA
graphs, B 128: shuffle overhead 1.7 % with per-layer draws, 0.7 % with the plan); without a plan each call draws its
own.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor, nn

SCHEDULES = ("linear", "constant")


def shuffle_probabilities(rate: float, depth: int, schedule: str = "linear") -> list[float]:
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown shuffle schedule {schedule!r}; choose one of {SCHEDULES}")
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"shuffle rate must be in [0, 1], got {rate}")
    if depth == 1:
        return [0.0]
    if schedule == "linear":
        # torch.linspace as in the official code, so the float values match bit for bit
        return [p.item() for p in torch.linspace(0, rate, depth, device="cpu")]
    return [0.0] + [float(rate)] * (depth - 1)


class LayerwiseShuffle(nn.Module):
    """Wraps the calls of a layer stack: ``hidden, residual = shuffle(i, layer, hidden, residual)``.

    ``hidden`` and ``residual`` are (B, L, D); the layer returns the same pair. Holds no parameters, so it never
    changes a state_dict. ``fired`` counts how often each layer shuffled (for tests and logging).
    """

    def __init__(self, depth: int, rate: float = 0.0, schedule: str = "linear"):
        super().__init__()
        self.depth = depth
        self.set_rate(rate, schedule)

    def set_rate(self, rate: float, schedule: Optional[str] = None) -> None:
        self.rate = float(rate)
        self.schedule = schedule or getattr(self, "schedule", "linear")
        self.probs = shuffle_probabilities(self.rate, self.depth, self.schedule)
        self.fired = [0] * self.depth

    def extra_repr(self) -> str:
        return f"depth={self.depth}, rate={self.rate}, schedule={self.schedule}"

    def plan(self, hidden: Tensor) -> Optional[tuple[Tensor, Tensor]]:
        """Every layer's permutation and its inverse for one traced forward, as two (depth, L) index tensors (rows of
        layers whose coin says no, and of layers that never shuffle, are the identity); None in eager mode (the
        host-side coins skip the layers that do not fire) and when nothing can fire."""
        if not (self.training and torch.compiler.is_compiling() and max(self.probs) > 0.0):
            return None
        seqlen, device = hidden.shape[1], hidden.device
        fires = torch.rand(self.depth, device=device) < torch.tensor(self.probs, device=device)  # (depth,)
        identity = torch.arange(seqlen, device=device).expand(self.depth, seqlen)
        # argsort of i.i.d. uniform keys: a uniformly random permutation per row, all rows in one sort
        perms = torch.where(fires[:, None], torch.rand(self.depth, seqlen, device=device).argsort(dim=1), identity)
        return perms, torch.empty_like(perms).scatter_(1, perms, identity)  # (depth, L) each

    def forward(self, index: int, layer: Callable, hidden: Tensor, residual: Optional[Tensor],
                plan: Optional[tuple[Tensor, Tensor]] = None):
        p = self.probs[index]
        if not self.training or p <= 0.0:
            return layer(hidden, residual)
        seqlen, device = hidden.shape[1], hidden.device
        if torch.compiler.is_compiling():
            if plan is not None:
                return self._permuted(plan[0][index], layer, hidden, residual, plan[1][index])
            fires = torch.rand((), device=device) < p  # device-side coin: no host sync, no graph break
            perm = torch.where(fires, torch.randperm(seqlen, device=device), torch.arange(seqlen, device=device))
            return self._permuted(perm, layer, hidden, residual)
        if torch.rand(1).item() >= p:  # CPU generator: no device sync
            return layer(hidden, residual)
        self.fired[index] += 1
        return self._permuted(torch.randperm(seqlen, device=device), layer, hidden, residual)

    @staticmethod
    def _permuted(perm: Tensor, layer: Callable, hidden: Tensor, residual: Optional[Tensor],
                  inverse: Optional[Tensor] = None):
        """``layer`` on the tokens reordered by ``perm`` (one permutation for the batch), original order restored."""
        if inverse is None:
            inverse = torch.empty_like(perm).scatter_(0, perm, torch.arange(perm.numel(), device=perm.device))
        hidden = _PermuteTokens.apply(hidden, perm, inverse)
        if residual is not None:
            residual = _PermuteTokens.apply(residual, perm, inverse)
        hidden, residual = layer(hidden, residual)
        return _PermuteTokens.apply(hidden, inverse, perm), _PermuteTokens.apply(residual, inverse, perm)


class _PermuteTokens(torch.autograd.Function):
    """``x.index_select(1, perm)`` for a permutation ``perm``, whose gradient is the inverse permutation's gather.

    Why not plain ``index_select``: its backward is an ``index_add`` (atomic adds, for indices that may repeat), 2.2 ms
    of a 56 ms shufflemamba_tiny train step on an H200 and not deterministic; a permutation's adjoint is its inverse,
    a plain gather. Traceable by torch.compile (plain ops on both sides)."""

    @staticmethod
    def forward(ctx, x: Tensor, perm: Tensor, inverse: Tensor) -> Tensor:
        ctx.save_for_backward(inverse)
        return x.index_select(1, perm)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (inverse,) = ctx.saved_tensors
        return grad.index_select(1, inverse), None, None

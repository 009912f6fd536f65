"""Which instances get teacher supervision, from which teacher, and with what weight.

The three dynamic-KD decisions of Li et al. (2021), as pure functions of the student's
logits ``[B, K]``. Every weight and index here comes from detached logits: uncertainty
steers the loss but is never itself trained.
"""

from __future__ import annotations

import math

import torch

from shared.uncertainty import check_logits, entropy, max_entropy, uncertainty_scores

SELECTION_STRATEGIES = ("none", "random", "entropy", "margin", "lc")

# int(B·r) in floating point misses by one ulp (0.29 * 100 = 28.999…); this nudge is far
# below any meaningful ratio difference and restores the intended count.
_FLOOR_EPS = 1e-9


def _check_ratio(ratio: float) -> None:
    if not (isinstance(ratio, int | float) and 0.0 <= ratio <= 1.0):
        raise ValueError(f"ratio must be a number in [0, 1], got {ratio!r}")


def _check_strategy(strategy: str) -> None:
    if strategy not in SELECTION_STRATEGIES:
        raise ValueError(f"strategy must be one of {SELECTION_STRATEGIES}, got {strategy!r}")


def num_selected(batch_size: int, ratio: float) -> int:
    """``n = int(B·r)``: how many of a batch the teacher sees."""
    _check_ratio(ratio)
    return min(batch_size, math.floor(batch_size * ratio + _FLOOR_EPS))


def _rank(logits: torch.Tensor, strategy: str, count: int, generator: torch.Generator | None) -> torch.Tensor:
    """The ``count`` instances chosen by ``strategy``, most uncertain first (ties: lower index)."""
    batch_size = logits.shape[0]
    if strategy == "none":
        return torch.arange(batch_size, device=logits.device)
    if strategy == "random":
        device = generator.device if generator is not None else torch.device("cpu")
        return torch.randperm(batch_size, generator=generator, device=device)[:count].to(logits.device)
    scores = uncertainty_scores(logits.detach().double(), strategy)  # fp64: no ties near ln K
    return torch.sort(scores, descending=True, stable=True).indices[:count]


def select_instances(
    logits: torch.Tensor,
    strategy: str,
    ratio: float,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Indices of the ``int(B·r)`` instances to send to the teacher, most uncertain first.

    ``entropy`` and ``lc`` pick the largest scores, ``margin`` the smallest; ``random`` is a
    uniform sample without replacement (the paper's baseline); ``none`` returns every index
    and ignores ``ratio``. ``n = 0`` gives an empty index.
    """
    check_logits(logits)
    _check_strategy(strategy)
    return _rank(logits, strategy, num_selected(logits.shape[0], ratio), generator)


class ExactBudgetSelector:
    """``select_instances`` whose per-batch counts add up to ``round(N·r)`` over an epoch.

    ``int(B·r)`` loses the fraction every batch (B = 32, r = 0.1 selects 3, not 3.2). This
    carries the remainder forward: after batches of sizes ``B_1..B_t`` exactly
    ``round(r·ΣB)`` instances have been selected. Call :meth:`reset` at each epoch start;
    the carry is part of the training state (:meth:`state_dict`).
    """

    def __init__(self, strategy: str, ratio: float, generator: torch.Generator | None = None) -> None:
        _check_strategy(strategy)
        _check_ratio(ratio)
        self.strategy, self.ratio, self.generator = strategy, float(ratio), generator
        self.reset()

    def reset(self) -> None:
        # Starting at one half turns the running floor into a running round().
        self.carry = 0.5

    def select(self, logits: torch.Tensor) -> torch.Tensor:
        check_logits(logits)
        wanted = logits.shape[0] * self.ratio + self.carry
        count = min(logits.shape[0], math.floor(wanted + _FLOOR_EPS))
        self.carry = wanted - count
        return _rank(logits, self.strategy, count, self.generator)

    def state_dict(self) -> dict[str, float]:
        return {"carry": self.carry}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.carry = float(state["carry"])


def hard_split(logits: torch.Tensor, k: int = 2) -> tuple[torch.Tensor, ...]:
    """Route each instance to one of ``k`` teachers, smallest first: ``k`` index tensors.

    Sort by entropy, descending, and cut into ``k`` equal groups at ``⌊i·B/k⌋``: the least
    confident group goes to the smallest teacher (the paper's direction), the most confident to
    the largest, which also takes the remainder. ``k = 2`` is the paper's split: the first
    ``⌊B/2⌋`` to the small teacher, the rest (the odd middle one included) to the large one.
    """
    check_logits(logits)
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    order = torch.sort(entropy(logits.detach().double()), descending=True, stable=True).indices
    cuts = [i * logits.shape[0] // k for i in range(k + 1)]
    return tuple(order[cuts[i] : cuts[i + 1]] for i in range(k))


def _relative_entropy(logits: torch.Tensor) -> torch.Tensor:
    """``u/U`` in [0, 1], detached."""
    check_logits(logits)
    u = entropy(logits.detach()) / max_entropy(logits.shape[1])
    return u.clamp(0.0, 1.0)


def soft_teacher_weights(
    logits: torch.Tensor, per_instance: bool = True, k: int = 2
) -> tuple[torch.Tensor, ...]:
    """Each of ``k`` teachers' weight per instance (smallest teacher first): unsure instances lean
    on the small teachers.

    With ``x = u/U``, teacher ``j = 0..k-1`` (ordered by FLOPs per token) gets the Bernstein weight
    ``w_j = C(k-1, j) · x^(k-1-j) · (1-x)^j``: every weight is in [0, 1] and they sum to
    ``(x + 1 - x)^(k-1) = 1``; ``k = 2`` is the paper's ``(u/U, 1 - u/U)`` bit for bit
    (``x^1 = x``, ``x^0 = 1``).
    ``per_instance=False`` uses the batch mean of ``u/U`` for every instance (what the reference
    script did; offered as ``soft-batch``). Every weight is ``[B]``.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    x = _relative_entropy(logits)
    if not per_instance:
        x = x.mean().expand_as(x).clone()
    return tuple(math.comb(k - 1, j) * x.pow(k - 1 - j) * (1.0 - x).pow(j) for j in range(k))


def supervision_weights(
    logits: torch.Tensor, lambda_kl: float = 1.0, lambda_pt: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(w_kl, w_pt) = (λ_KL·(1 - u/U), λ_PT·u/U)`` per instance.

    Confident instances learn the teacher's answer (KL); unsure ones learn its internal
    representations (the patient loss).
    """
    u = _relative_entropy(logits)
    return lambda_kl * (1.0 - u), lambda_pt * u

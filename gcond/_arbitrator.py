"""The arbitrator: who wins a main or critical conflict (docs/algorithm.md, steps 3 and 6)."""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence

import torch


class Arbitrator:
    """Scores each loss by *stability* (its gradient still points where it did last step) and
    *strength* (its gradient norm relative to its own EMA), and remembers recent winners so a loss
    that won the last ``dominance_window`` arbitrations wins the next one outright.

    With ``dominance_rule="sticky"`` (the original rule) an outright win extends the streak that
    earned it, so a loss that won ``dominance_window`` arbitrations in a row wins every later one
    as long as conflicts go on. With ``"bounded"`` a streak earns at most ``dominance_window``
    outright wins; then the history is cleared and the scores decide again.

    Scores are set once per step from the raw accumulated gradients, before any projection, so a
    decision depends on the step's data and the history, not on the order of projections.
    """

    def __init__(
        self,
        num_losses: int,
        *,
        dominance_window: int = 3,
        tie_breaking_weights: tuple[float, float] = (0.8, 0.2),
        norm_ema_beta: float = 0.95,
        eps: float = 1e-8,
        dominance_rule: str = "bounded",
    ) -> None:
        if dominance_rule not in ("sticky", "bounded"):
            raise ValueError(
                f"dominance_rule must be 'sticky' or 'bounded', got {dominance_rule!r}"
            )
        self.num_losses = num_losses
        self.dominance_window = dominance_window
        self.dominance_rule = dominance_rule
        self.outright = 0  # outright wins in a row (the bounded rule's count)
        self.stability_weight, self.strength_weight = tie_breaking_weights
        self.norm_ema_beta = norm_ema_beta
        self.eps = eps
        self.norm_ema: list[float | None] = [None] * num_losses
        self.history: deque[int] = deque(maxlen=max(dominance_window, 1))
        self._stability = [0.0] * num_losses
        self._strength = [0.0] * num_losses

    def observe(self, norms: Sequence[float], prev_cosines: Sequence[float] | None) -> None:
        """Update the norm EMAs with this step's raw norms and set this step's scores.

        ``prev_cosines[k]`` is cos(g_k, g_k_prev); None on the first step (stability scores 0).
        """
        beta = self.norm_ema_beta
        for k, norm in enumerate(norms):
            ema = self.norm_ema[k]
            self.norm_ema[k] = norm if ema is None else beta * ema + (1.0 - beta) * norm
        self._strength = [
            n / max(ema or 0.0, self.eps) for n, ema in zip(norms, self.norm_ema, strict=True)
        ]
        if prev_cosines is None:
            self._stability = [0.0] * self.num_losses
        else:
            self._stability = [max(0.0, c) if math.isfinite(c) else 0.0 for c in prev_cosines]

    def score(self, k: int, other: int) -> float:
        """``w_stab · max(0, cos(g_k, g_k_prev)) + w_str · s_k / (s_k + s_other)``."""
        return self._score(k, other, self._strength, self._stability)

    def _score(
        self, k: int, other: int, strength: Sequence[float], stability: Sequence[float]
    ) -> float:
        s_k, s_o = strength[k], strength[other]
        share = s_k / (s_k + s_o) if s_k + s_o > self.eps else 0.5
        return self.stability_weight * stability[k] + self.strength_weight * share

    def dominant(self) -> int | None:
        """The loss that won each of the last ``dominance_window`` arbitrations, if any."""
        window = self.dominance_window
        if window <= 0 or len(self.history) < window:
            return None
        first = self.history[0]
        return first if all(w == first for w in self.history) else None

    def pick(self, i: int, j: int) -> tuple[int, bool]:
        """Winner of the pair (i, j) and whether the dominance rule decided it. Records the winner.

        An exact tie goes to the loss listed first (the lower index).
        """
        winner, by_dominance = self.decide(i, j, self._strength, self._stability)
        self.record(winner, by_dominance)
        return winner, by_dominance

    def record(self, winner: int, by_dominance: bool) -> None:
        """Remember a winner; the bounded rule counts the outright wins in a row."""
        bounded = self.dominance_rule == "bounded"
        self.outright = self.outright + 1 if bounded and by_dominance else 0
        self.history.append(winner)

    def decide(
        self, i: int, j: int, strength: Sequence[float], stability: Sequence[float]
    ) -> tuple[int, bool]:
        """:meth:`pick`'s rule with the given scores' inputs, recording nothing (under the bounded
        rule a streak that has had its outright wins is forgotten first)."""
        if self.dominance_rule == "bounded" and self.outright >= self.dominance_window:
            self.history.clear()
            self.outright = 0
        dominant = self.dominant()
        if dominant in (i, j):
            return dominant, True
        si = self._score(i, j, strength, stability)
        sj = self._score(j, i, strength, stability)
        return (i if si > sj else j if sj > si else min(i, j)), False

    def strengths(self, norms: Sequence[float]) -> list[float]:
        """``‖g_k‖ / ema_k`` against the EMAs as they stand (1 where a loss has none yet),
        without updating them: representation mode's micro-batch decisions."""
        return [
            n / max(ema, self.eps) if ema is not None else 1.0
            for n, ema in zip(norms, self.norm_ema, strict=True)
        ]

    def state_dict(self) -> dict[str, torch.Tensor]:
        initialised = [e is not None for e in self.norm_ema]
        return {
            "norm_ema": torch.tensor([e or 0.0 for e in self.norm_ema], dtype=torch.float64),
            "norm_ema_initialised": torch.tensor(initialised, dtype=torch.bool),
            "history": torch.tensor(list(self.history), dtype=torch.int64),
        } | ({"outright": torch.tensor(self.outright)} if self.dominance_rule == "bounded" else {})

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        emas = state["norm_ema"].tolist()
        flags = state["norm_ema_initialised"].tolist()
        self.norm_ema = [e if f else None for e, f in zip(emas, flags, strict=True)]
        self.history.clear()
        self.history.extend(int(w) for w in state["history"].tolist())
        self.outright = int(state["outright"]) if "outright" in state else 0

    def __repr__(self) -> str:
        return (
            f"Arbitrator(num_losses={self.num_losses}, dominance_window={self.dominance_window}, "
            f"tie_breaking_weights=({self.stability_weight}, {self.strength_weight}), "
            f"norm_ema_beta={self.norm_ema_beta}, eps={self.eps}, "
            f"dominance_rule={self.dominance_rule!r})"
        )

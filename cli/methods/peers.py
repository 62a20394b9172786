"""The peer methods users pick instead of ours, each one entry of the method table (issue 18).

Two kinds, by where they act:

* **Resolvers** in the conductor, fed its per-loss gradients accumulated over the step's
  micro-batches (K backwards per micro-batch, like ``pcgrad``):
  ``config`` (TorchJD's ConFIG) and ``nashmtl`` (TorchJD's NashMTL) need the K×P matrix itself
  rather than a weighting of its Gram matrix; both are unchanged by a rotation of parameter
  space, so they are fed a K×K matrix with the same Gram matrix (:func:`gram_factor`), and their
  direction is turned back into merge weights: no K×P work, and everything the conductor does
  (DDP, FSDP, momentum) still holds. ``db-mtl`` (Lin et al. 2023) is written here
  (:class:`DBMTLResolver`). TorchJD's Gram weightings (``alignedmtl``, ``imtlg``, ``dualproj``)
  need nothing of this module: they are ``methods.build_torchjd`` entries.
* **Scalarisers**: one backward per micro-batch of one scalar made from the K losses, like
  ``sum``: ``geometric-mean`` and ``famo`` (TorchJD's GeometricMean and FAMO scalarizers) and
  ``uncertainty`` (Kendall et al. 2018, written here).

The losses a peer sees are the weighted ``λ_k L_k`` (its gradients ``λ_k ∇L_k``) like every
method's; the scale-free peers (db-mtl, famo, nashmtl) then use λ only through which losses take
part and the size of the update.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from gcond import Gradients, Resolved, autocast, call_model, frozen_batchnorm, norm_cap_scales

from ..errors import MethodUnavailable
from .base import LossFn, Method, SumMethod, conductor_with
from .torchjd import TorchJDResolver

# DB-MTL's EMA of each loss's gradient, ĝ ← β_t ĝ + (1 − β_t) g with β_t = β / t^σ: the
# paper's β = 0.9 and the authors' default σ = 0 (a constant β).
DBMTL_BETA = 0.9
DBMTL_BETA_SIGMA = 0.0
# Kendall et al.'s log-variances s_k are trained by the method's own Adam (the harness's
# optimizer holds the model's parameters only): the step size of FAMO's task logits, a
# problem of the same kind (K numbers learned alongside the model).
UNCERTAINTY_LR = 0.025
# Which TorchJD extra each peer's solver comes from.
_EXTRAS = {"nashmtl": "nashmtl"}


def peer_unavailable(name: str) -> str | None:
    """Why the peer ``name`` cannot run here (a missing optional dependency), or None."""
    try:
        if name in ("config", "nashmtl"):
            matrix_aggregator(name, 2)
        elif name in ("geometric-mean", "famo"):
            _scalarization(name)
    except MethodUnavailable as exc:
        return str(exc)
    return None


def _torchjd(name: str, module: str) -> Any:
    """``torchjd.<module>``, or MethodUnavailable naming what to install."""
    try:
        return __import__(f"torchjd.{module}", fromlist=["_"])
    except ImportError:
        extra = _EXTRAS.get(name, "torchjd")
        raise MethodUnavailable(
            f"method {name!r} needs TorchJD: pip install 'gcond[{extra}]'"
        ) from None


def matrix_aggregator(name: str, num_losses: int) -> Any:
    """TorchJD's ConFIG or NashMTL (for ``num_losses`` tasks)."""
    aggregation = _torchjd(name, "aggregation")
    try:
        if name == "config":
            return aggregation.ConFIG()
        return aggregation.NashMTL(n_tasks=num_losses)
    except ImportError as exc:  # NashMTL's solver (cvxpy, ecos)
        raise MethodUnavailable(
            f"method {name!r} is not available here: {exc} (pip install "
            f"'gcond[{_EXTRAS.get(name, 'torchjd')}]')"
        ) from None


def _scalarization(name: str) -> Any:
    return _torchjd(name, "scalarization")


# ------------------------------------------------------------------------------ resolvers


def gram_factor(gram: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(R, V, r)`` with ``R = V·diag(r)`` (K×K) and ``R Rᵀ = gram``: row k of R is g_k in an
    orthonormal basis of the gradients' span (``gram = V diag(r²) Vᵀ``; r = 0 off the span)."""
    eigenvalues, vectors = torch.linalg.eigh(gram)
    tol = eigenvalues.abs().max() * gram.shape[0] * torch.finfo(gram.dtype).eps
    roots = torch.where(eigenvalues > tol, eigenvalues.clamp_min(0).sqrt(), 0.0)
    return vectors * roots, vectors, roots


class TorchJDMatrixResolver(TorchJDResolver):
    """A TorchJD aggregator of the K×P matrix (ConFIG, NashMTL) as the conductor's resolver.

    An aggregator A with ``A(G Q) = A(G) Q`` for every Q with orthonormal columns gives, on the
    K×K factor R of the Gram matrix (:func:`gram_factor`), the direction d in the basis of the
    gradients' span; the merge weights are the w with ``Rᵀ w = d`` (``w = V diag(1/r) d``), so
    ``Σ_k w_k g_k = A(G)``. A stateful aggregator (NashMTL: its last weights, its step count and
    its normalisation) keeps its state in the conductor's.
    """

    def _weigh(self, gram: torch.Tensor) -> torch.Tensor:
        factor, vectors, roots = gram_factor(gram)
        direction = self.aggregator(factor)  # ConFIG and NashMTL draw no random numbers
        inverse = torch.where(roots > 0, 1.0 / roots.clamp_min(torch.finfo(roots.dtype).tiny), 0.0)
        return vectors @ (inverse * direction.to(vectors.dtype))

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        weighting = getattr(self.aggregator, "weighting", None)
        if hasattr(weighting, "prvs_alpha"):  # NashMTL (private names of TorchJD 0.18)
            state["nashmtl"] = {
                "step": float(weighting.step),
                "alpha": torch.from_numpy(weighting.prvs_alpha.copy()),
                "normalization": torch.from_numpy(weighting.normalization_factor.copy()),
            }
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        if "nashmtl" in state:
            saved, weighting = state["nashmtl"], self.aggregator.weighting
            weighting.prvs_alpha = saved["alpha"].numpy().copy()
            weighting.normalization_factor = saved["normalization"].numpy().copy()
            weighting.step = saved["step"]
            if weighting.step > 0 and weighting.prvs_alpha_param is None:
                weighting._init_optim_problem()  # built on the first call otherwise

    def __repr__(self) -> str:
        return f"TorchJDMatrixResolver({self.aggregator!r}, norm_cap={self.norm_cap!r})"


class DBMTLResolver:
    """DB-MTL's gradient balancing (Lin et al. 2023), over gradients of ``log L_k``.

    Each step: ``ĝ_k ← β_t ĝ_k + (1 − β_t) g_k`` (ĝ = 0 before the first step, β_t = β / t^σ),
    then the update ``Σ_k (max_j ‖ĝ_j‖ / ‖ĝ_k‖) ĝ_k``: every EMA rescaled to the largest norm.
    The update merges the EMAs, not this step's gradients, so the resolver writes them over the
    step's stack and Gram matrix, which the conductor then merges with these weights (and keeps
    as the previous gradients of the next step). ``norm_cap`` caps the raw gradients first.
    State: the K×P EMAs and t. Statistics: ``ema_norm/<loss>``.
    """

    def __init__(
        self,
        loss_names: list[str],
        *,
        beta: float = DBMTL_BETA,
        beta_sigma: float = DBMTL_BETA_SIGMA,
        norm_cap: float | None = None,
    ) -> None:
        self.loss_names = list(loss_names)
        self.beta, self.beta_sigma, self.norm_cap = beta, beta_sigma, norm_cap
        self.ema: torch.Tensor | None = None
        self.steps = 0

    def resolve(self, gradients: Gradients) -> Resolved:
        stack = gradients.stack
        scale = norm_cap_scales(gradients.norms, self.norm_cap)
        if scale is not None:
            stack.mul_(scale.to(stack.device, stack.dtype)[:, None])
        if self.ema is None:
            self.ema = torch.zeros_like(stack)
        self.steps += 1
        beta = self.beta / self.steps**self.beta_sigma
        self.ema.mul_(beta).add_(stack, alpha=1.0 - beta)
        stack.copy_(self.ema)
        gradients.gram = (stack @ stack.T).to("cpu", torch.float64)  # a host-device sync
        norms = gradients.norms
        top = max(norms)
        weights = torch.tensor([top / n if n > 0 else 0.0 for n in norms], dtype=torch.float64)
        stats = {f"ema_norm/{name}": n for name, n in zip(self.loss_names, norms, strict=True)}
        return Resolved(weights, stats)

    def state_dict(self) -> dict[str, Any]:
        ema = None if self.ema is None else self.ema.detach().clone()
        return {"dbmtl_ema": ema, "dbmtl_steps": self.steps}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.steps = int(state["dbmtl_steps"])
        ema = state["dbmtl_ema"]
        self.ema = None if ema is None else ema.clone()

    def __repr__(self) -> str:
        return (
            f"DBMTLResolver(loss_names={self.loss_names!r}, beta={self.beta!r}, "
            f"beta_sigma={self.beta_sigma!r}, norm_cap={self.norm_cap!r})"
        )


# ConFIG / NashMTL as the conductor's resolver (see :class:`TorchJDMatrixResolver`).
build_torchjd_matrix = conductor_with(
    lambda cfg, loss_fns: TorchJDMatrixResolver(
        matrix_aggregator(cfg.method, len(loss_fns)), norm_cap=cfg.norm_cap
    )
)
_dbmtl_conductor = conductor_with(
    lambda cfg, loss_fns: DBMTLResolver(list(loss_fns), norm_cap=cfg.norm_cap)
)


def build_dbmtl(cfg: Any, model: nn.Module, *args: Any, **kwargs: Any) -> Method:
    """DB-MTL: the conductor's accumulation of ``∇ log L_k`` (``build_method`` log-scales the
    losses), :class:`DBMTLResolver`, the conductor's update."""
    method = _dbmtl_conductor(cfg, model, *args, **kwargs)
    if method.sharded:  # type: ignore[attr-defined]
        raise ValueError(
            "conductor.method db-mtl cannot run under fully_shard yet (its gradient EMAs are "
            "not sharded): use distributed.strategy: ddp"
        )
    return method


# ------------------------------------------------------------------------------ scalarisers


class GeometricMeanMethod(SumMethod):
    """TorchJD's GeometricMean scalarizer (the geometric loss strategy of Chennupati et al.
    2019): each micro-batch's backward differentiates ``(Π_k λ_k L_k)^(1/K)`` over the losses
    with λ_k > 0, whose gradient is that mean times ``(1/K) Σ_k ∇L_k / L_k``. TorchJD checks
    the values are ≥ 0: one host-device sync per micro-batch."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.scalarizer = _scalarization("geometric-mean").GeometricMean()
        self._active = torch.nonzero(self._lambdas > 0).flatten()

    def objective(self, values: torch.Tensor) -> torch.Tensor:
        return self.scalarizer((values * self._lambdas)[self._active])


class FAMOMethod(SumMethod):
    """TorchJD's FAMO scalarizer (Liu et al. 2023) over the weighted losses ``λ_k L_k`` with
    λ_k > 0: one backward per micro-batch of ``c Σ_k z_k log(λ_k L_k)`` (z = softmax of FAMO's
    task logits, c its normaliser), then, after the optimizer step, one forward per micro-batch
    of the same micro-batches to measure each loss's change, from which FAMO's own Adam moves
    the logits (``update``). That second half runs at the start of the next step, or in
    ``state_dict`` if a checkpoint comes first, so the state never holds the micro-batches. It
    runs without collectives, on the module itself (any RNG it draws is forked, BatchNorm
    statistics restored), so it refuses a distributed run: the ranks' logits would drift apart.
    State: the logits, their Adam state. Statistics: ``task_weight/<loss>`` (z).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if _world_size() > 1:
            raise ValueError(
                "conductor.method famo runs on one process: its task weights learn from the "
                "losses re-measured after each optimizer step, which the ranks do not share; "
                "train it without torchrun"
            )
        self._active = torch.nonzero(self._lambdas > 0).flatten()
        famo = _scalarization("famo").FAMO
        self.famo = famo(len(self._active)).to(self.device)
        self._before = torch.zeros(len(self._active), device=self.device)
        self._pending: list[Any] | None = None  # the last step's micro-batches, until measured

    def objective(self, values: torch.Tensor) -> torch.Tensor:
        weighted = (values * self._lambdas)[self._active]
        self._before += weighted.detach()
        return self.famo(weighted)

    def accumulate(self, data_provider: Callable[[], Any]) -> dict[str, float]:
        self._update_weights()
        batches: list[Any] = []

        def recorded() -> Any:
            batches.append(data_provider())
            return batches[-1]

        self._before.zero_()
        stats = super().accumulate(recorded)
        if not stats["skipped"]:
            self._pending = batches
        z = torch.softmax(self.famo.state_dict()["_w"], dim=0).tolist()
        names = [self.loss_names[i] for i in self._active.tolist()]
        stats.update({f"task_weight/{n}": w for n, w in zip(names, z, strict=True)})
        return stats

    @torch.no_grad()
    def _update_weights(self) -> None:
        """FAMO's update from the pending micro-batches' losses before and after the step."""
        if self._pending is None:
            return
        batches, self._pending = self._pending, None
        module = getattr(self.model, "module", self.model)  # no DDP hooks: no collectives
        after = torch.zeros_like(self._before)
        bns = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        saved = [{k: v.clone() for k, v in m.state_dict().items()} for m in bns]
        training = module.training
        devices = [self.device] if self.device.type == "cuda" else []
        module.train()
        try:
            with torch.random.fork_rng(devices=devices), frozen_batchnorm(module, self.freeze_bn):
                for x, target in batches:
                    with autocast(self.device, self.autocast_dtype):  # as the step's forward
                        output = call_model(module, x)
                        values = torch.stack(
                            [self.loss_fns[k](output, target).float() for k in self.loss_names]
                        )
                    after += (values * self._lambdas)[self._active]
        finally:
            module.train(training)
            for m, state in zip(bns, saved, strict=True):
                m.load_state_dict(state)
        n = len(batches)
        self.famo(self._before / n)  # the values FAMO's update compares against
        self.famo.update(after / n)

    def state_dict(self) -> dict[str, Any]:
        self._update_weights()
        optimizer = self.famo._optimizer  # created by FAMO's first update (TorchJD 0.18)
        return {
            **super().state_dict(),
            "famo": {k: v.detach().clone() for k, v in self.famo.state_dict().items()},
            # A copy: an optimizer's state_dict holds its live moment tensors.
            "famo_optimizer": None if optimizer is None else copy.deepcopy(optimizer.state_dict()),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self.famo.load_state_dict(state["famo"])
        self._pending = None
        if state["famo_optimizer"] is not None:
            famo = self.famo
            famo._optimizer = torch.optim.Adam(
                [famo._w], lr=famo.lr, weight_decay=famo.weight_decay
            )
            famo._optimizer.load_state_dict(state["famo_optimizer"])


class UncertaintyMethod(SumMethod):
    """Uncertainty weighting (Kendall, Gal and Cipolla 2018), in its regression form: each
    micro-batch's backward differentiates ``Σ_k λ_k (½ e^(−s_k) L_k + ½ s_k)`` with s_k = log σ_k²
    learned (0 at the start: σ² = 1). The ½'s are the Gaussian likelihood's, as the paper derives
    it (and TorchJD's UW); λ_k = 1 is the paper's loss. The s_k are this method's: their gradient
    (unscaled under fp16, averaged over the ranks of a DDP run) feeds the method's own Adam
    (lr :data:`UNCERTAINTY_LR`, no weight decay) on every applied step, and they are saved in its
    state with that Adam's. Statistics: ``log_var/<loss>`` (s_k after the step).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.log_vars = torch.zeros(len(self.loss_names), device=self.device, requires_grad=True)
        self.optimizer = torch.optim.Adam([self.log_vars], lr=UNCERTAINTY_LR)

    def objective(self, values: torch.Tensor) -> torch.Tensor:
        s = self.log_vars
        return (self._lambdas * (0.5 * torch.exp(-s) * values + 0.5 * s)).sum()

    def accumulate(self, data_provider: Callable[[], Any]) -> dict[str, float]:
        self.log_vars.grad = None
        stats = super().accumulate(data_provider)
        grad = self.log_vars.grad
        if grad is not None and not stats["skipped"]:
            if self.scaler is not None and self.scaler.is_enabled():
                grad.div_(self.scaler.scale(torch.ones((), device=self.device)))
            if _world_size() > 1:
                torch.distributed.all_reduce(grad)  # SUM (gloo has no AVG)
                grad.div_(_world_size())
            if bool(torch.isfinite(grad).all()):
                self.optimizer.step()
        self.log_vars.grad = None
        for name, s in zip(self.loss_names, self.log_vars.tolist(), strict=True):
            stats[f"log_var/{name}"] = s
        return stats

    def state_dict(self) -> dict[str, Any]:
        return {
            **super().state_dict(),
            "log_vars": self.log_vars.detach().clone(),
            "log_var_optimizer": copy.deepcopy(self.optimizer.state_dict()),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        with torch.no_grad():
            self.log_vars.copy_(state["log_vars"])
        self.optimizer.load_state_dict(state["log_var_optimizer"])


def _world_size() -> int:
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


_SCALARISERS: dict[str, type[SumMethod]] = {
    "geometric-mean": GeometricMeanMethod,
    "famo": FAMOMethod,
    "uncertainty": UncertaintyMethod,
}


def build_scalarised(
    cfg: Any,
    model: nn.Module,
    loss_fns: Mapping[str, LossFn],
    lambdas: Mapping[str, float],
    *,
    autocast_dtype: torch.dtype | None,
    scaler: torch.amp.GradScaler | None,
) -> Method:
    """A scalarising peer: one backward per micro-batch, like ``sum``."""
    return _SCALARISERS[cfg.method](
        model,
        loss_fns,
        lambdas,
        cfg.accumulation_steps,
        freeze_bn=cfg.freeze_bn,
        autocast_dtype=autocast_dtype,
        scaler=scaler,
    )


__all__ = [
    "DBMTLResolver",
    "FAMOMethod",
    "GeometricMeanMethod",
    "TorchJDMatrixResolver",
    "UncertaintyMethod",
    "build_dbmtl",
    "build_scalarised",
    "build_torchjd_matrix",
    "gram_factor",
    "matrix_aggregator",
    "peer_unavailable",
]

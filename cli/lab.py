"""The conflict lab: a synthetic multi-task problem whose conflict is set by two dials.

Whether conflict resolution can matter depends on two things, and here each is a recipe key
(``data.lab``):

* ``direction``, the cosine between what the tasks want from the shared representation, from
  +1 (they want the same) through 0 (unrelated) to -1 (opposed);
* ``scale``, the ratio of the last task's loss to the first's at the start (1 to 1000).

The problem. Inputs x ~ N(0, I) of ``input_dim`` floats. A teacher is a fixed random two-layer
tanh network R^input_dim -> R^output_dim, normalised to unit variance per output. Task 0 learns
teacher T_0; task k > 0 learns ``direction · T_0 + sqrt(1 - direction²) · T_k`` with T_k an
independent teacher, so the two targets have correlation ``direction``. Task k's target is then
multiplied by sqrt(scale^(k / (K-1))), so its squared error, hence its loss, starts ``scale``
times the first task's (the last task's) and its gradient sqrt(scale) times. Observation noise
of standard deviation ``noise`` (in unit-variance units) is added to the training targets only.

The model (``model.name: lab_mlp``): a shared MLP trunk (``model.depth`` layers of
``model.dim``, GELU) ending in a shared representation z of ``output_dim`` floats, and per task a
head y_k = exp(ρ_k) ⊙ z + b_k: a positive gain per output and a bias. The heads can follow a task's
scale (log-gain) but cannot flip a sign, so opposed targets really pull z in opposite directions
— with free linear heads, -1 would be as easy as +1 (the head would just negate) and the
direction dial would do nothing.

Losses (``kind: task_mse``): the mean squared error of the task whose name is the loss's name.
Evaluation, on a fixed validation set and noise-free targets: ``eval/err_<task>``, each task's
mean squared error divided by its target's variance (0 = perfect, 1 = no better than predicting
0; scale-free, so tasks of any scale are comparable), and ``eval/mean_err``, their mean — the
lab's single multi-task score (lower is better). ``gcond compare`` reports its difference
against ``sum`` with a confidence interval.

Data are drawn on the CPU from generators keyed by (seed, rank, micro-batch number) and sent to
the device: the teachers and the validation set are fixed by the dials alone (the same for every
seed), the training stream by the seed. Every micro-batch is fresh (no epochs), so the provider's
state is one counter and a resumed run continues the exact stream.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn

from .data import BuiltinData, _generator
from .losses import task_mse

_TEACHER_KEY = "conflict-lab-teacher"
_VAL_KEY = "conflict-lab-validation"
_TEACHER_HIDDEN = 32
_CALIBRATION_SAMPLES = 8192  # to normalise each teacher output to unit variance


class Teacher:
    """A fixed random two-layer tanh network, its outputs normalised to unit variance."""

    def __init__(self, input_dim: int, output_dim: int, index: int) -> None:
        generator = _generator(_TEACHER_KEY, input_dim, output_dim, index)
        self.first = torch.randn(input_dim, _TEACHER_HIDDEN, generator=generator)
        self.first /= math.sqrt(input_dim) / 2  # pre-activations of std 2: tanh is nonlinear
        self.second = torch.randn(_TEACHER_HIDDEN, output_dim, generator=generator)
        probe = torch.randn(_CALIBRATION_SAMPLES, input_dim, generator=generator)
        raw = self._raw(probe)
        self.mean, self.std = raw.mean(0), raw.std(0)

    def _raw(self, x: Tensor) -> Tensor:
        return torch.tanh(x @ self.first) @ self.second

    def __call__(self, x: Tensor) -> Tensor:
        return (self._raw(x) - self.mean) / self.std


class LabProblem:
    """The tasks' noise-free targets as a function of x (on the CPU), from the dials."""

    def __init__(self, lab_cfg: Any, task_names: list[str]) -> None:
        self.cfg, self.names = lab_cfg, list(task_names)
        count = len(self.names)
        self.teachers = [Teacher(lab_cfg.input_dim, lab_cfg.output_dim, k) for k in range(count)]
        # Loss scale of task k relative to task 0: scale^(k/(K-1)); targets scale by its root.
        self.amplitudes = [
            math.sqrt(lab_cfg.scale ** (k / max(count - 1, 1))) for k in range(count)
        ]

    def targets(self, x: Tensor) -> dict[str, Tensor]:
        c = self.cfg.direction
        base = self.teachers[0](x)
        out = {}
        for k, name in enumerate(self.names):
            signal = base if k == 0 else c * base + math.sqrt(1 - c * c) * self.teachers[k](x)
            out[name] = self.amplitudes[k] * signal
        return out


class LabProvider:
    """Fresh micro-batches ``(x, {task: target})`` on the device, counter-based."""

    def __init__(
        self,
        problem: LabProblem,
        data_cfg: Any,
        device: torch.device,
        seed: int,
        rank: int = 0,
    ) -> None:
        self.problem, self.cfg, self.device = problem, data_cfg, torch.device(device)
        self.seed, self.rank = seed, rank
        self.micro_batches_served = 0

    def __call__(self) -> tuple[Tensor, dict[str, Tensor]]:
        generator = _generator(self.seed, "conflict-lab", self.rank, self.micro_batches_served)
        count, lab = self.cfg.micro_batch_size, self.cfg.lab
        x = torch.randn(count, lab.input_dim, generator=generator)
        targets = self.problem.targets(x)
        for k, name in enumerate(self.problem.names):
            noise = torch.randn(count, lab.output_dim, generator=generator)
            targets[name] = targets[name] + lab.noise * self.problem.amplitudes[k] * noise
        self.micro_batches_served += 1
        # One host-to-device copy for the batch and its targets.
        packed = torch.cat([x, *targets.values()], dim=1).to(self.device)
        x, *parts = packed.split([lab.input_dim] + [lab.output_dim] * len(targets), dim=1)
        return x, dict(zip(targets, parts, strict=True))

    def state_dict(self) -> dict[str, int]:
        return {"micro_batches_served": self.micro_batches_served}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.micro_batches_served = int(state["micro_batches_served"])


def lab_val_batches(
    problem: LabProblem, data_cfg: Any, device: torch.device, batch_size: int
) -> list[tuple[Tensor, dict[str, Tensor]]]:
    """The fixed validation set (the same for every seed), noise-free targets, on the device."""
    generator = _generator(_VAL_KEY, data_cfg.lab.input_dim)
    x = torch.randn(data_cfg.val_samples, data_cfg.lab.input_dim, generator=generator)
    targets = problem.targets(x)
    batches = []
    for start in range(0, x.shape[0], batch_size):
        part = slice(start, start + batch_size)
        batches.append(
            (x[part].to(device), {name: t[part].to(device) for name, t in targets.items()})
        )
    return batches


class LabMLP(nn.Module):
    """Shared MLP trunk -> representation z; per task y_k = exp(ρ_k) ⊙ z + b_k."""

    def __init__(
        self, input_dim: int, output_dim: int, dim: int, depth: int, tasks: list[str]
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = input_dim
        for _ in range(depth):
            layers += [nn.Linear(width, dim), nn.GELU()]
            width = dim
        layers.append(nn.Linear(width, output_dim))
        self.trunk = nn.Sequential(*layers)
        self.log_gain = nn.ParameterDict(
            {name: nn.Parameter(torch.zeros(output_dim)) for name in tasks}
        )
        self.bias = nn.ParameterDict(
            {name: nn.Parameter(torch.zeros(output_dim)) for name in tasks}
        )

    def heads(self, z: Tensor) -> dict[str, Tensor]:
        """The per-task gain/bias heads on the representation z (``self.trunk(x)``): the split
        that ``conductor.gradients_at: representation`` needs."""
        return {name: self.log_gain[name].exp() * z + self.bias[name] for name in self.log_gain}

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        return self.heads(self.trunk(x))


def lab_eval_sums(
    output: dict[str, Tensor], target: dict[str, Tensor], problem: LabProblem
) -> dict[str, Tensor]:
    """Per-batch sums for the eval loop: each task's squared error over its target's variance
    (the teacher has unit variance, so the variance is amplitude²), and the sample count."""
    sums = {}
    for k, name in enumerate(problem.names):
        error = (output[name].float() - target[name].float()).square().mean(1)
        sums[f"err_{name}"] = (error / problem.amplitudes[k] ** 2).sum()
    count = next(iter(target.values())).shape[0]
    sums["mean_err"] = sum(sums.values()) / len(problem.names)
    sums["count"] = torch.full((), float(count), device=next(iter(target.values())).device)
    return sums


class LabData(BuiltinData):
    """The conflict lab as a run's data source (see ``run.py``): one task per loss."""

    def __init__(
        self,
        cfg: Any,
        recipe: Any,
        *,
        device: torch.device,
        rank: int = 0,
        world_size: int = 1,
        datasets: Any = None,
        console: Any = None,
    ) -> None:
        from .tasks import SummedMetrics

        self.problem = LabProblem(cfg.lab, list(recipe.losses))
        self.provider = LabProvider(self.problem, cfg, device, recipe.seed, rank=rank)
        self.batches = lab_val_batches(self.problem, cfg, device, recipe.eval.batch_size)
        self.task = SummedMetrics(partial(lab_eval_sums, problem=self.problem))


build_lab_data = LabData  # the registry's builder of dataset conflict_lab


def build_lab_mlp(cfg: Any, recipe: Any) -> nn.Module:
    """The lab's model (a LabModelConfig), one head per task (loss)."""
    lab = recipe.data.lab
    return LabMLP(lab.input_dim, lab.output_dim, cfg.dim, cfg.depth, list(recipe.losses))


def build_task_mse(name: str, cfg: Any, recipe: Any) -> Callable[..., Tensor]:
    """The error on the task of the loss's name."""
    return task_mse(name)

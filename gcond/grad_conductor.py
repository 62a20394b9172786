"""Where the original GCond lived (its README has users copy it in as
``gcond/grad_conductor.py``): ``from gcond.grad_conductor import GradientConductor`` keeps
working. Its keyword spellings and defaults are mapped in ``docs/algorithm.md``, "Migrating from
the original GCond"."""

from ._conductor import GradientConductor

__all__ = ["GradientConductor"]

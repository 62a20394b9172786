"""The method table: every method a recipe's ``conductor.method`` may name, registered with its
builder (in ``methods/``: ``base``, ``torchjd``, ``peers``), and what each needs installed beyond
the harness."""

import importlib.util

from ..components import register

# The methods, one entry each: name, builder (in methods/), what it is.
for _name, _build, _summary in (
    ("conductor", "build_conductor", "GradientConductor: conflicts resolved by zone or smoothly"),
    ("conductor-stochastic", "build_conductor", "the conductor, one loss per micro-batch"),
    ("sum", "build_sum", "plain accumulation of the weighted losses"),
    ("sum-log", "build_sum", "sum with loss_scale log (the scale-invariant baseline)"),
    ("sum-normalized", "build_sum", "sum with loss_scale initial"),
    ("pcgrad", "build_torchjd", "TorchJD's PCGrad (pip install 'gcond[torchjd]')"),
    ("upgrad", "build_torchjd", "TorchJD's UPGrad (pip install 'gcond[torchjd]')"),
    ("mgda", "build_torchjd", "TorchJD's MGDA (pip install 'gcond[torchjd]')"),
    ("cagrad", "build_torchjd", "TorchJD's CAGrad (pip install 'gcond[torchjd,cagrad]')"),
    # The peers of issue 18 (methods/peers.py); the last three scalarise: one backward per
    # micro-batch.
    ("alignedmtl", "build_torchjd", "TorchJD's Aligned-MTL (pip install 'gcond[torchjd]')"),
    ("imtlg", "build_torchjd", "TorchJD's IMTL-G (pip install 'gcond[torchjd]')"),
    ("dualproj", "build_torchjd", "TorchJD's DualProj (pip install 'gcond[torchjd]')"),
    (
        "config",
        "methods.peers:build_torchjd_matrix",
        "TorchJD's ConFIG (pip install 'gcond[torchjd]')",
    ),
    (
        "nashmtl",
        "methods.peers:build_torchjd_matrix",
        "TorchJD's NashMTL (pip install 'gcond[nashmtl]')",
    ),
    (
        "db-mtl",
        "methods.peers:build_dbmtl",
        "DB-MTL: log losses, gradient EMAs rescaled to the largest",
    ),
    ("geometric-mean", "methods.peers:build_scalarised", "TorchJD's GeometricMean of the losses"),
    (
        "famo",
        "methods.peers:build_scalarised",
        "TorchJD's FAMO (1 backward + 1 forward per micro-batch)",
    ),
    ("uncertainty", "methods.peers:build_scalarised", "Kendall et al.'s learned log-variances"),
):
    register("method", _name, _build if ":" in _build else f"methods:{_build}", summary=_summary)

# What a method needs beyond the harness: the modules, and the gcond extra that installs them.
_TORCHJD_ONLY = (("torchjd",), "torchjd")
_QUADPROG = (("torchjd", "quadprog", "qpsolvers"), "torchjd")
METHOD_NEEDS: dict[str, tuple[tuple[str, ...], str]] = {
    **dict.fromkeys(("pcgrad", "mgda", "alignedmtl", "imtlg", "config"), _TORCHJD_ONLY),
    **dict.fromkeys(("geometric-mean", "famo"), _TORCHJD_ONLY),
    **dict.fromkeys(("upgrad", "dualproj"), _QUADPROG),
    "cagrad": (("torchjd", "cvxpy", "clarabel"), "cagrad"),
    "nashmtl": (("torchjd", "cvxpy", "ecos"), "nashmtl"),
}


def missing_dependency(method: str) -> str | None:
    """What ``method`` needs and is not installed, with the command that installs it; None when
    nothing is missing. Looks the modules up without importing them (no torch)."""
    modules, extra = METHOD_NEEDS.get(method, ((), ""))
    missing = [name for name in modules if not _installed(name)]
    if not missing:
        return None
    return f"method {method!r} needs {', '.join(missing)}: pip install 'gcond[{extra}]'"


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ValueError, AttributeError):  # a module set to None in sys.modules (a test's stub)
        return False

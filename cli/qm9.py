"""QM9: 130,831 small organic molecules, eleven regression targets of very different difficulty.

The data (``data.dataset: qm9``). The molecules and their DFT properties as they ship inside the
``qm9pack`` wheel (``pip install -e ".[qm9]"``; its ``qm9pack/data/qm9_part{1,2,3}.csv``, read from
the installed package's folder, no download), or the CSV files of that format in ``data.root``. The
targets, one per loss and named after it (`QM9_TARGETS`), are the eleven of the multi-task
literature (Nash-MTL, FAMO, LibMTL), in its order and units:

=========  ===========================================  ==========
loss       property                                     unit
=========  ===========================================  ==========
``mu``     dipole moment μ                              D
``alpha``  isotropic polarizability α                   a0³
``homo``   ε_HOMO                                       meV
``lumo``   ε_LUMO                                       meV
``r2``     electronic spatial extent ⟨R²⟩               a0²
``zpve``   zero-point vibrational energy                meV
``u0``     atomization internal energy at 0 K           meV
``u``      atomization internal energy at 298.15 K      meV
``h``      atomization enthalpy at 298.15 K             meV
``g``      atomization free energy at 298.15 K          meV
``cv``     heat capacity at 298.15 K                    cal/(mol K)
=========  ===========================================  ==========

qm9pack stores the energies as totals in Hartree; an atomization energy is the total minus the
sum of its atoms' reference energies (`ATOM_REFERENCES_EV`, QM9's own per-atom values), in eV
(`HARTREE_TO_EV`), then meV.

Features (`molecule_features`): the Coulomb matrix's eigenvalues (M_ii = Z_i^2.4 / 2,
M_ij = Z_i Z_j / |R_i - R_j| in Bohr), sorted by magnitude and padded to `MAX_ATOMS`, plus the
counts of H, C, N, O and F. The counts make the part of an energy that grows with each atom
(most of it) learnable by a linear map. They are built once and cached next to the runs
(``<log.runs_dir>/.cache/qm9-<key>.npz``), keyed by the source files (names, sizes, times) and
by this module's feature code, so a change to either rebuilds it, and a cache that cannot be
read back whole is rebuilt rather than trusted.

The split (the same for every seed, fixed by the number of molecules alone): a permutation cut
into ``data.test_samples`` test molecules, ``data.val_samples`` validation molecules and
``data.train_samples`` training molecules. Inputs and targets are standardised with the
training molecules' mean and standard deviation only. Training micro-batches are drawn with
replacement from the training molecules by a CPU generator keyed by (seed, rank, micro-batch
number), so the provider's state is one counter and a resumed run continues the exact stream.

The model (``model.name: qm9_mlp``): a shared MLP trunk to z (``model.depth`` layers of
``model.dim``, SiLU), ``model.trunk(x)``, and one linear head per target, ``model.heads(z) ->
{target: B}``. Losses (``kind: qm9_mse``): the squared error of the loss's target, standardised.
Evaluation, on both fixed held-out sets: ``eval/val_std_mae`` and ``eval/test_std_mae``, the mean
over the targets of the MAE in units of each target's training standard deviation (the model
is selected on the validation one), and ``eval/test_mae_<target>``, each target's test MAE in
the unit above, the papers' metric.
"""

from __future__ import annotations

import csv
import hashlib
import importlib.util
import inspect
import json
import math
import os
import re
import sys
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .data import BuiltinData, _generator
from .errors import DatasetError
from .losses import task_mse

HARTREE_TO_EV = 27.211386246
ELEMENTS = ("H", "C", "N", "O", "F")
ATOMIC_NUMBER = {"H": 1, "C": 6, "N": 7, "O": 8, "F": 9}
MAX_ATOMS = 29  # the largest QM9 molecule
# QM9's reference energy of each free atom (H, C, N, O, F), in eV, for the atomization energies.
ATOM_REFERENCES_EV = {
    "u0": (-13.61312172, -1029.86312267, -1485.30251237, -2042.61123593, -2713.48485589),
    "u": (-13.5745904, -1029.82456413, -1485.26398105, -2042.5727046, -2713.44632457),
    "h": (-13.54887564, -1029.79887659, -1485.2382935, -2042.54701705, -2713.42063702),
    "g": (-13.90303183, -1030.25891228, -1485.71166277, -2043.01812778, -2713.88796536),
}
# Each target: the qm9pack column it is read from and the factor to the papers' unit.
MEV_PER_HARTREE = HARTREE_TO_EV * 1000.0
QM9_TARGETS: dict[str, tuple[str, float, str]] = {
    "mu": ("Dipole_debye", 1.0, "D"),
    "alpha": ("Polarizability_bohr3", 1.0, "a0³"),
    "homo": ("HOMO_au", MEV_PER_HARTREE, "meV"),
    "lumo": ("LUMO_au", MEV_PER_HARTREE, "meV"),
    "r2": ("R2_bohr2", 1.0, "a0²"),
    "zpve": ("ZPVE_au", MEV_PER_HARTREE, "meV"),
    "u0": ("InternalEnergy_0K_au", MEV_PER_HARTREE, "meV"),
    "u": ("InternalEnergy_298K_au", MEV_PER_HARTREE, "meV"),
    "h": ("Enthalphy_298K_au", MEV_PER_HARTREE, "meV"),  # sic: qm9pack's spelling
    "g": ("GibbsFreeEnergy_298K_au", MEV_PER_HARTREE, "meV"),
    "cv": ("Heatcapacity_Cv_cal_mol_K", 1.0, "cal/(mol K)"),
}
COLUMNS = ("Index", "Elements", "XYZ_Ang", *(column for column, _, _ in QM9_TARGETS.values()))
ANGSTROM_TO_BOHR = 1.0 / 0.529177210903
NUM_FEATURES = MAX_ATOMS + len(ELEMENTS)
QM9_EXTRA = 'pip install -e ".[qm9]"'
_SPLIT_KEY = "qm9-split"
CACHE_FORMAT = 1  # the layout of the cached arrays


def qm9pack_data_dir() -> Path:
    """The folder of CSV files inside the installed qm9pack wheel; a DatasetError saying how to
    install it when it is not."""
    spec = importlib.util.find_spec("qm9pack")  # finds the package without running it
    if spec is None or not spec.submodule_search_locations:
        raise DatasetError(
            f"data.dataset 'qm9' reads the molecules from the qm9pack package, which is not "
            f"installed; install it with: {QM9_EXTRA}  (or pip install 'qm9pack>=1.0.3'), or "
            "point data.root at a folder of CSV files in its format"
        )
    # Not importlib.resources.files("qm9pack"): that imports the package, whose __init__
    # imports pkg_resources (gone from recent setuptools).
    return Path(next(iter(spec.submodule_search_locations))) / "data"


def source_files(root: Path) -> list[Path]:
    """The molecule CSVs of a qm9pack-format folder: ``qm9_part*.csv``, in name order."""
    if not root.is_dir():
        raise DatasetError(f"data.root: {root} is not a folder of QM9 CSV files")
    found = sorted(root.glob("qm9_part*.csv"))
    if not found:
        raise DatasetError(f"{root}: no qm9_part*.csv files (qm9pack's format) in this folder")
    return found


# ---------------------------------------------------------------------------- targets, features


def atomization_mev(total_hartree: float, counts: Iterable[int], target: str) -> float:
    """A total energy (Hartree) as an atomization energy in meV: total − Σ atom references."""
    references = sum(n * ref for n, ref in zip(counts, ATOM_REFERENCES_EV[target], strict=True))
    return (total_hartree * HARTREE_TO_EV - references) * 1000.0


def coulomb_eigenvalues(charges: Tensor, positions: Tensor) -> Tensor:
    """Sorted Coulomb-matrix eigenvalues of a batch of molecules, padded with zeros.

    charges: float64 B×A (0 where an atom slot is empty); positions: float64 B×A×3 in Bohr.
    Returns float64 B×A, each row sorted by decreasing magnitude."""
    distance = torch.cdist(positions, positions)
    outer = charges.unsqueeze(2) * charges.unsqueeze(1)
    eye = torch.eye(charges.shape[1], dtype=torch.bool)
    off_diagonal = torch.where(eye, torch.zeros_like(outer), outer / distance.masked_fill(eye, 1.0))
    matrix = off_diagonal + torch.diag_embed(0.5 * charges.pow(2.4))
    values = torch.linalg.eigvalsh(matrix)
    order = values.abs().argsort(dim=1, descending=True)
    return values.gather(1, order)


def molecule_features(elements: list[list[str]], positions: list[list[list[float]]]) -> Tensor:
    """float32 N×NUM_FEATURES: Coulomb-matrix eigenvalues (MAX_ATOMS) then element counts (5)."""
    count = len(elements)
    charges = torch.zeros(count, MAX_ATOMS, dtype=torch.float64)
    coords = torch.zeros(count, MAX_ATOMS, 3, dtype=torch.float64)
    counts = torch.zeros(count, len(ELEMENTS), dtype=torch.float64)
    for i, (atoms, xyz) in enumerate(zip(elements, positions, strict=True)):
        numbers = [ATOMIC_NUMBER[a] for a in atoms]
        charges[i, : len(atoms)] = torch.tensor(numbers, dtype=torch.float64)
        coords[i, : len(atoms)] = torch.tensor(xyz, dtype=torch.float64) * ANGSTROM_TO_BOHR
        for a in atoms:
            counts[i, ELEMENTS.index(a)] += 1
    # Empty slots sit far apart at distinct points so that no distance is 0 (their charge is 0,
    # so they add nothing to the matrix but zero eigenvalues).
    empty = charges == 0
    far = 1e6 * torch.arange(1, MAX_ATOMS + 1, dtype=torch.float64).unsqueeze(1).expand(-1, 3)
    coords = torch.where(empty.unsqueeze(2), far.expand(count, -1, -1), coords)
    chunks = [  # 4,096 molecules at a time: 29×29 matrices, a few MB each
        coulomb_eigenvalues(charges[s : s + 4096], coords[s : s + 4096])
        for s in range(0, count, 4096)
    ]
    eigen = torch.cat(chunks) if chunks else torch.zeros(0, MAX_ATOMS, dtype=torch.float64)
    return torch.cat([eigen, counts], dim=1).float()


@dataclass
class Molecules:
    """Every molecule of a source: QM9 index (int64 N), features (float32 N×NUM_FEATURES) and
    the eleven targets in the papers' units (float64 N×11, `QM9_TARGETS` order)."""

    index: Tensor
    features: Tensor
    targets: Tensor

    def __len__(self) -> int:
        return self.index.shape[0]


def _coordinates(text: str) -> list[list[float]]:
    """``[[x,y,z],...]`` as qm9pack writes it (``0.`` and Mathematica's ``1.5*^-6`` included)."""
    numbers = [float(v.replace("*^", "e")) for v in re.findall(r"[^\[\],\s]+", text)]
    if len(numbers) % 3:
        raise ValueError(f"XYZ_Ang holds {len(numbers)} numbers, not x, y, z per atom")
    return [numbers[i : i + 3] for i in range(0, len(numbers), 3)]


def read_csv(
    path: Path, limit: int | None = None
) -> tuple[list[int], list[list[str]], list[list[list[float]]], list[list[float]]]:
    """One qm9pack CSV (its first ``limit`` molecules, all without): indices, element lists,
    coordinates (Å) and targets (papers' units). A missing column, an unreadable or non-finite
    value or an unknown element is a DatasetError naming the file, the line and the problem."""
    indices, elements, positions, targets = [], [], [], []
    csv.field_size_limit(sys.maxsize)
    try:
        with path.open(newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            missing = [c for c in COLUMNS if c not in (reader.fieldnames or [])]
            if missing:
                raise DatasetError(f"{path}: missing column(s) {', '.join(missing)}")
            for line, row in enumerate(reader, start=2):
                if limit is not None and len(indices) >= limit:
                    break
                try:
                    atoms = [a.strip(" '\"") for a in row["Elements"].strip("[]").split(",")]
                    unknown = sorted(set(atoms) - set(ELEMENTS))
                    if unknown:
                        raise ValueError(
                            f"unknown element {unknown[0]!r} (QM9 has {', '.join(ELEMENTS)})"
                        )
                    xyz = _coordinates(row["XYZ_Ang"])
                    if len(xyz) != len(atoms) or len(atoms) > MAX_ATOMS:
                        raise ValueError(
                            f"{len(atoms)} elements but {len(xyz)} coordinates (at most "
                            f"{MAX_ATOMS} atoms)"
                        )
                    counts = [atoms.count(e) for e in ELEMENTS]
                    values = []
                    for name, (column, factor, _) in QM9_TARGETS.items():
                        value = float(row[column])
                        if not math.isfinite(value):
                            raise ValueError(f"{column} is {row[column]!r}, not a finite number")
                        if name in ATOM_REFERENCES_EV:
                            values.append(atomization_mev(value, counts, name))
                        else:
                            values.append(value * factor)
                    indices.append(int(row["Index"]))
                except (ValueError, TypeError, KeyError, AttributeError) as exc:
                    raise DatasetError(f"{path}:{line}: {exc}") from None
                elements.append(atoms)
                positions.append(xyz)
                targets.append(values)
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DatasetError(f"{path}: cannot be read: {exc}") from None
    return indices, elements, positions, targets


def build_molecules(files: list[Path]) -> Molecules:
    """Parse ``files`` and compute every molecule's features."""
    indices, elements, positions, targets = [], [], [], []
    for path in files:
        part = read_csv(path)
        indices += part[0]
        elements += part[1]
        positions += part[2]
        targets += part[3]
    if not indices:
        raise DatasetError(f"{files[0].parent}: the QM9 CSV files hold no molecules")
    return Molecules(
        torch.tensor(indices, dtype=torch.int64),
        molecule_features(elements, positions),
        torch.tensor(targets, dtype=torch.float64),
    )


# ---------------------------------------------------------------------------- the cache


def feature_code_digest() -> str:
    """A digest of the code that turns CSV rows into cached arrays: a change rebuilds caches."""
    parts = [read_csv, atomization_mev, coulomb_eigenvalues, molecule_features, build_molecules]
    text = "".join(inspect.getsource(fn) for fn in parts)
    text += repr((CACHE_FORMAT, QM9_TARGETS, ATOM_REFERENCES_EV, HARTREE_TO_EV, MAX_ATOMS))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def cache_key(files: list[Path]) -> str:
    """The cache's key: the source files (name, size, modification time) and the feature code."""
    stats = [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files]
    text = json.dumps([str(files[0].parent.resolve()), stats, feature_code_digest()])
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def _read_cache(path: Path, key: str) -> Molecules | None:
    """The cached molecules, or None when the file is missing, unreadable, of another key or
    inconsistent (then it is rebuilt)."""
    import numpy as np

    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            if str(data["key"]) != key:
                return None
            molecules = Molecules(
                torch.from_numpy(data["index"].astype("int64")),
                torch.from_numpy(data["features"].astype("float32")),
                torch.from_numpy(data["targets"].astype("float64")),
            )
    except Exception:  # a truncated or corrupt file: whatever numpy raises, rebuild it
        return None
    n = len(molecules)
    shapes_ok = molecules.features.shape == (n, NUM_FEATURES) and molecules.targets.shape == (
        n,
        len(QM9_TARGETS),
    )
    finite = bool(molecules.features.isfinite().all() and molecules.targets.isfinite().all())
    return molecules if n and shapes_ok and finite else None


def _write_cache(path: Path, key: str, molecules: Molecules) -> None:
    """Write the cache atomically: a crash leaves the old file or none, never half of one."""
    import numpy as np

    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as out:
            np.savez(
                out,
                key=np.array(key),
                index=molecules.index.numpy(),
                features=molecules.features.numpy(),
                targets=molecules.targets.numpy(),
            )
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def load_molecules(root: Path | None, cache_dir: Path, console: Any = None) -> Molecules:
    """Every molecule of ``root`` (qm9pack's folder when None), from the cache when it is
    current, else parsed, featurised and cached."""
    files = source_files(root if root is not None else qm9pack_data_dir())
    key = cache_key(files)
    path = cache_dir / f"qm9-{key}.npz"
    molecules = _read_cache(path, key)
    if molecules is not None:
        return molecules
    if console is not None:
        console.print(
            f"qm9: reading {len(files)} CSV file(s) from {files[0].parent} and building the "
            f"features once (cached in {path})",
            markup=False,
        )
    molecules = build_molecules(files)
    _write_cache(path, key, molecules)
    return molecules


# ---------------------------------------------------------------------------- split, scaling


@dataclass
class Split:
    """Row indices into `Molecules` of the three fixed sets."""

    train: Tensor
    val: Tensor
    test: Tensor


def make_split(count: int, train: int, val: int, test: int) -> Split:
    """The fixed split: one permutation of ``count`` molecules (the same for every seed), cut
    into test, validation and training rows."""
    if train + val + test > count:
        raise DatasetError(
            f"data.train_samples + val_samples + test_samples = {train + val + test}, but the "
            f"QM9 source has {count} molecules; lower them"
        )
    order = torch.randperm(count, generator=_generator(_SPLIT_KEY, count))
    return Split(order[test + val : test + val + train], order[test : test + val], order[:test])


@dataclass
class Standardizer:
    """Mean and standard deviation of each column, from the training rows only."""

    mean: Tensor
    std: Tensor

    @classmethod
    def fit(cls, values: Tensor) -> Standardizer:
        std = values.std(dim=0)
        return cls(values.mean(dim=0), torch.where(std > 0, std, torch.ones_like(std)))

    def __call__(self, values: Tensor) -> Tensor:
        return (values - self.mean) / self.std


@dataclass
class QM9Sets:
    """The standardised sets (inputs float32, targets float32 in training-std units), and the
    targets' scaler (to turn an error back into the papers' units)."""

    train: tuple[Tensor, Tensor]
    val: tuple[Tensor, Tensor]
    test: tuple[Tensor, Tensor]
    target_scale: Standardizer


def standardized_sets(molecules: Molecules, split: Split) -> QM9Sets:
    """Inputs and targets of each set, scaled by the training rows' statistics."""
    inputs = Standardizer.fit(molecules.features[split.train].double())
    targets = Standardizer.fit(molecules.targets[split.train])

    def scaled(rows: Tensor) -> tuple[Tensor, Tensor]:
        x = inputs(molecules.features[rows].double()).float()
        return x, targets(molecules.targets[rows]).float()

    return QM9Sets(scaled(split.train), scaled(split.val), scaled(split.test), targets)


# ---------------------------------------------------------------------------- the run's data


class QM9Provider:
    """Training micro-batches ``(x, {target: y})`` on the device, drawn with replacement by a
    counter-based generator (see the module docstring)."""

    def __init__(
        self,
        sets: QM9Sets,
        tasks: list[str],
        micro_batch_size: int,
        device: torch.device,
        seed: int,
        rank: int = 0,
    ) -> None:
        self.device = torch.device(device)
        x, y = sets.train
        columns = [list(QM9_TARGETS).index(t) for t in tasks]
        self.x, self.y = x.to(self.device), y[:, columns].to(self.device)
        self.tasks, self.micro_batch_size = tasks, micro_batch_size
        self.seed, self.rank = seed, rank
        self.micro_batches_served = 0

    def __call__(self) -> tuple[Tensor, dict[str, Tensor]]:
        generator = _generator(self.seed, "qm9", self.rank, self.micro_batches_served)
        picks = torch.randint(self.x.shape[0], (self.micro_batch_size,), generator=generator)
        self.micro_batches_served += 1
        picks = picks.to(self.device)
        y = self.y[picks]
        return self.x[picks], {t: y[:, i] for i, t in enumerate(self.tasks)}

    def state_dict(self) -> dict[str, int]:
        return {"micro_batches_served": self.micro_batches_served, "train_rows": self.x.shape[0]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if int(state["train_rows"]) != self.x.shape[0]:
            raise ValueError(
                f"data provider state is for {int(state['train_rows'])} training molecules, this "
                f"recipe has {self.x.shape[0]}; resume with the same data.train_samples"
            )
        self.micro_batches_served = int(state["micro_batches_served"])


class QM9Evaluation:
    """Validation and test errors (see the module docstring); ``batches`` are
    ``(set name, x, y)`` with y standardised, one column per task."""

    def __init__(self, tasks: list[str], scale: Standardizer) -> None:
        columns = [list(QM9_TARGETS).index(t) for t in tasks]
        self.tasks, self.std = tasks, scale.std[columns].float()

    def evaluate(
        self, model: nn.Module, batches: Iterable[Any], precision: Callable[[], Any]
    ) -> tuple[dict[str, float], dict[str, Tensor]]:
        sums: dict[str, Tensor] = {}
        counts: dict[str, int] = {}
        for name, x, y in batches:
            with precision():
                output = model(x)
            prediction = torch.stack([output[t].float() for t in self.tasks], dim=1)
            error = (prediction - y).abs().sum(dim=0)  # per task, in training-std units
            sums[name] = sums.get(name, 0) + error
            counts[name] = counts.get(name, 0) + x.shape[0]
        val = sums["val"] / counts["val"]
        test = sums["test"] / counts["test"]
        host = torch.cat([val.mean().view(1), test.mean().view(1), test * self.std.to(test)])
        values = host.tolist()  # one sync per evaluation
        metrics = {"val_std_mae": values[0], "test_std_mae": values[1]}
        metrics.update({f"test_mae_{t}": v for t, v in zip(self.tasks, values[2:], strict=True)})
        return metrics, {}


def _batches(
    name: str, xy: tuple[Tensor, Tensor], columns: list[int], device: torch.device, size: int
) -> list[tuple[str, Tensor, Tensor]]:
    x, y = xy
    return [
        (name, x[s : s + size].to(device), y[s : s + size][:, columns].to(device))
        for s in range(0, x.shape[0], size)
    ]


class QM9Data(BuiltinData):
    """QM9 as a run's data source: the training provider, the fixed validation and test sets."""

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
        root = Path(cfg.root).expanduser() if cfg.root else None
        cache_dir = Path(recipe.log.runs_dir) / ".cache"
        molecules = load_molecules(root, cache_dir, console)
        split = make_split(len(molecules), cfg.train_samples, cfg.val_samples, cfg.test_samples)
        sets = standardized_sets(molecules, split)
        tasks = list(recipe.losses)
        columns = [list(QM9_TARGETS).index(t) for t in tasks]
        self.provider = QM9Provider(sets, tasks, cfg.micro_batch_size, device, recipe.seed, rank)
        size = recipe.eval.batch_size
        self.batches = _batches("val", sets.val, columns, device, size) + _batches(
            "test", sets.test, columns, device, size
        )
        self.task = QM9Evaluation(tasks, sets.target_scale)


build_qm9_data = QM9Data  # the registry's builder of dataset qm9


class QM9MLP(nn.Module):
    """A shared MLP trunk to z, one linear head per target: ``model(x) == heads(trunk(x))``."""

    def __init__(self, tasks: list[str], dim: int = 256, depth: int = 3) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = NUM_FEATURES
        for _ in range(depth):
            layers += [nn.Linear(width, dim), nn.SiLU()]
            width = dim
        self.trunk = nn.Sequential(*layers)
        self.head = nn.ModuleDict({task: nn.Linear(dim, 1) for task in tasks})

    def heads(self, z: Tensor) -> dict[str, Tensor]:
        """One prediction per target, B each (standardised units)."""
        return {task: head(z).squeeze(-1) for task, head in self.head.items()}

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        return self.heads(self.trunk(x))


def build_qm9_mlp(cfg: Any, recipe: Any) -> nn.Module:
    """The QM9 model (a Qm9MlpConfig), one head per target (loss)."""
    return QM9MLP(list(recipe.losses), dim=cfg.dim, depth=cfg.depth)


def build_qm9_mse(name: str, cfg: Any, recipe: Any) -> Callable[..., Tensor]:
    """The squared error of the standardised target of the loss's name."""
    return task_mse(name)

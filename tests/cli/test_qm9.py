"""QM9: atomization energies of named molecules, the split and train-only standardisation, the
feature cache (rebuilt on a changed source, changed feature code or a corrupt file), the missing
extra and bad files as clear errors, and the recipe end to end on a committed slice of 306 real
rows in qm9pack's format (``tests/data/qm9``); one test reads the real package when installed."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
from pathlib import Path

import pytest
import torch

from gcond_cli import qm9
from gcond_cli.errors import DatasetError
from gcond_cli.recipe import QM9_TARGET_NAMES, RecipeError, load_recipe
from tests.helpers import DATA

SLICE = DATA / "qm9"
SLICE_ROWS = 306
HAS_QM9PACK = importlib.util.find_spec("qm9pack") is not None


def _tiny_recipe(tmp_path: Path, root: Path = SLICE, *lines: str) -> Path:
    """A few-step QM9 recipe on ``root``, its runs under ``tmp_path/runs``."""
    text = f"""
seed: 0
device: cpu
data: {{dataset: qm9, root: "{root}", micro_batch_size: 16, train_samples: 200,
        val_samples: 50, test_samples: 50}}
model: {{name: qm9_mlp, dim: 16, depth: 2}}
losses:
  mu: {{kind: qm9_mse, weight: 1.0}}
  u0: {{kind: qm9_mse, weight: 1.0}}
  cv: {{kind: qm9_mse, weight: 1.0}}
conductor: {{method: conductor, accumulation_steps: 2}}
optimizer: {{name: adamw, lr: 1.0e-3, weight_decay: 0.0}}
schedule: {{max_steps: 6}}
eval: {{every: 3, batch_size: 32}}
log: {{every: 3, tensorboard: false, runs_dir: "{tmp_path / "runs"}"}}
checkpoint: {{every: 6, best_metric: eval/val_std_mae, best_mode: min}}
""" + "\n".join(lines)
    path = tmp_path / "qm9_tiny.yaml"
    path.write_text(text)
    return path


def _by_index(rows: tuple) -> dict[int, list[float]]:
    indices, _, _, targets = rows
    return dict(zip(indices, targets, strict=True))


# ---------------------------------------------------------------------------- targets, features


def test_the_targets_are_the_papers_eleven_in_their_order():
    expected = ("mu", "alpha", "homo", "lumo", "r2", "zpve", "u0", "u", "h", "g", "cv")
    assert tuple(qm9.QM9_TARGETS) == QM9_TARGET_NAMES == expected


def test_atomization_energies_of_methane_and_water():
    targets = _by_index(qm9.read_csv(SLICE / "qm9_part1.csv"))
    names = list(qm9.QM9_TARGETS)
    methane, water = targets[1], targets[3]
    # CH4: U0 total −40.47893 Ha; QM9's atomization energy is −17.17 eV.
    assert methane[names.index("u0")] == pytest.approx(-17172.19, abs=0.01)  # meV
    # H2O: U0 −76.404702 Ha − (2 × H −13.61312172 eV + O −2042.61123593 eV) = −9.2404 eV.
    assert water[names.index("u0")] == pytest.approx(-9240.38, abs=0.01)
    # G uses its own references: −76.422349 Ha − (2 × −13.90303183 + −2043.01812778) eV.
    assert water[names.index("g")] == pytest.approx(-8733.87, abs=0.01)
    # Unit conversions: HOMO −0.3877 Ha in meV, the dipole and heat capacity as stored.
    assert methane[names.index("homo")] == pytest.approx(-0.3877 * 27211.386246)
    assert methane[names.index("mu")] == 0.0
    assert water[names.index("cv")] == 6.002


def test_features_are_sorted_coulomb_eigenvalues_and_element_counts():
    # H2 at 1.4 Bohr: M = [[0.5, 1/1.4], [1/1.4, 0.5]], eigenvalues 0.5 ± 1/1.4.
    angstrom = 1.4 / qm9.ANGSTROM_TO_BOHR
    features = qm9.molecule_features([["H", "H"]], [[[0, 0, 0], [0, 0, angstrom]]])
    assert features.shape == (1, qm9.NUM_FEATURES)
    eigen = features[0, : qm9.MAX_ATOMS]
    assert eigen[0].item() == pytest.approx(0.5 + 1 / 1.4, rel=1e-6)
    assert eigen[1].item() == pytest.approx(0.5 - 1 / 1.4, rel=1e-6)
    assert torch.count_nonzero(eigen[2:]) == 0  # padding
    assert features[0, qm9.MAX_ATOMS :].tolist() == [2, 0, 0, 0, 0]  # H, C, N, O, F
    # Invariant to the order of the atoms and to a rigid move.
    a = qm9.molecule_features([["O", "H", "H"]], [[[0, 0, 0], [0.96, 0, 0], [-0.24, 0.93, 0]]])
    b = qm9.molecule_features([["H", "O", "H"]], [[[1.96, 1, 1], [1, 1, 1], [0.76, 1.93, 1]]])
    assert torch.allclose(a, b, atol=1e-5)


def test_the_split_is_fixed_disjoint_and_standardised_on_training_rows_only():
    molecules = qm9.build_molecules(qm9.source_files(SLICE))
    assert len(molecules) == SLICE_ROWS
    split = qm9.make_split(len(molecules), 200, 50, 50)
    again = qm9.make_split(len(molecules), 200, 50, 50)
    assert torch.equal(split.train, again.train) and torch.equal(split.test, again.test)
    rows = torch.cat([split.train, split.val, split.test])
    assert rows.unique().numel() == 300
    sets = qm9.standardized_sets(molecules, split)
    train_targets = molecules.targets[split.train]
    assert torch.allclose(sets.target_scale.mean, train_targets.mean(0))
    assert torch.allclose(sets.target_scale.std, train_targets.std(0))
    # Whatever the held-out rows hold, the scaling of every set stays the same: change them.
    leaked = qm9.Molecules(molecules.index, molecules.features.clone(), molecules.targets.clone())
    held_out = torch.cat([split.val, split.test])
    leaked.targets[held_out] *= 1000.0
    leaked.features[held_out] += 50.0
    other = qm9.standardized_sets(leaked, split)
    assert torch.equal(other.train[0], sets.train[0]) and torch.equal(other.train[1], sets.train[1])
    assert torch.equal(other.target_scale.mean, sets.target_scale.mean)
    with pytest.raises(DatasetError, match="has 306 molecules"):
        qm9.make_split(len(molecules), 300, 50, 50)


# ---------------------------------------------------------------------------- the cache


def test_the_cache_is_reused_and_rebuilt_after_a_change_or_corruption(tmp_path, monkeypatch):
    source = tmp_path / "source"
    shutil.copytree(SLICE, source)
    cache = tmp_path / "cache"
    built = []
    real_build = qm9.build_molecules
    monkeypatch.setattr(qm9, "build_molecules", lambda files: built.append(1) or real_build(files))
    first = qm9.load_molecules(source, cache)
    (path,) = cache.glob("qm9-*.npz")
    qm9.load_molecules(source, cache)
    assert len(built) == 1  # the second load came from the cache
    # A changed source: a new key, rebuilt.
    part = source / "qm9_part3.csv"
    part.write_text("\n".join(part.read_text().splitlines()[:-1]) + "\n")
    assert len(qm9.load_molecules(source, cache)) == len(first) - 1
    assert len(built) == 2
    # Changed feature code: rebuilt.
    monkeypatch.setattr(qm9, "feature_code_digest", lambda: "changed")
    qm9.load_molecules(source, cache)
    assert len(built) == 3
    # A corrupt file under the current key: rebuilt, not trusted.
    current = cache / f"qm9-{qm9.cache_key(qm9.source_files(source))}.npz"
    current.write_bytes(current.read_bytes()[:200])
    again = qm9.load_molecules(source, cache)
    assert len(built) == 4 and len(again) == len(first) - 1
    assert not list(cache.glob("*.tmp"))
    assert path.exists()


def test_a_cache_missing_an_array_is_rebuilt(tmp_path):
    import numpy as np

    cache = tmp_path / "cache"
    molecules = qm9.load_molecules(SLICE, cache)
    (path,) = cache.glob("qm9-*.npz")
    key = path.stem.removeprefix("qm9-")
    np.savez(path, key=np.array(key), index=molecules.index.numpy())  # no features, no targets
    assert qm9._read_cache(path, key) is None
    assert torch.equal(qm9.load_molecules(SLICE, cache).features, molecules.features)


# ---------------------------------------------------------------------------- bad input


def _broken_copy(tmp_path: Path, edit) -> Path:
    source = tmp_path / "bad"
    source.mkdir()
    lines = (SLICE / "qm9_part1.csv").read_text().splitlines()
    (source / "qm9_part1.csv").write_text("\n".join(edit(lines)) + "\n")
    return source


def _nan_homo(lines: list[str]) -> list[str]:
    """Ammonia's (line 3) HOMO set to nan: its last columns hold no quoted commas."""
    header = lines[0].split(",")
    head, tail = lines[2].rsplit('"', 1)
    values = tail.split(",")
    values[header.index("HOMO_au") - (len(header) - len(values))] = "nan"
    return [lines[0], lines[1], head + '"' + ",".join(values), *lines[3:]]


@pytest.mark.parametrize(
    ("edit", "problem"),
    [
        (
            lambda lines: [lines[0].replace("Dipole_debye", "Dipole"), *lines[1:]],
            "qm9_part1.csv: missing column(s) Dipole_debye",
        ),
        (_nan_homo, "qm9_part1.csv:3: HOMO_au is 'nan', not a finite number"),
        (
            lambda lines: [lines[0], lines[1].replace("['C',", "['Xe',"), *lines[2:]],
            "qm9_part1.csv:2: unknown element 'Xe' (QM9 has H, C, N, O, F)",
        ),
    ],
    ids=["missing-column", "nan-target", "unknown-element"],
)
def test_a_bad_csv_exits_2_naming_the_file_and_the_problem(tmp_path, cli, edit, problem):
    source = _broken_copy(tmp_path, edit)
    result = cli("train", _tiny_recipe(tmp_path, source))
    assert result.exit_code == 2, result.output
    assert re.sub(r"\s", "", problem) in re.sub(r"\s", "", result.output)
    assert not list((tmp_path / "runs").glob(".cache/*")), "a cache was written"
    assert not list((tmp_path / "runs").glob("qm9_tiny/*")), "a run directory was left"


def test_without_qm9pack_a_qm9_recipe_exits_2_with_the_install_command(tmp_path, cli, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "qm9pack" else real(name, *a)
    )
    recipe = _tiny_recipe(tmp_path)
    text = recipe.read_text().replace(f'root: "{SLICE}", ', "")
    recipe.write_text(text)
    result = cli("train", recipe)
    assert result.exit_code == 2, result.output
    assert 'pip install -e ".[qm9]"' in " ".join(result.output.split())


def test_the_recipe_rules_tie_qm9_to_its_model_and_losses(tmp_path):
    with pytest.raises(RecipeError) as info:
        load_recipe(_tiny_recipe(tmp_path), ["losses.energy={kind: qm9_mse, weight: 1.0}"])
    assert any("a loss named after its QM9 target" in e for e in info.value.errors)
    with pytest.raises(RecipeError) as info:
        load_recipe("multidigits", ["model={name: qm9_mlp}"])
    assert any("qm9_mlp" in e for e in info.value.errors)


# ---------------------------------------------------------------------------- end to end


def test_train_on_the_slice_reports_every_target_and_selects_on_validation(tmp_path, cli):
    result = cli("train", _tiny_recipe(tmp_path), "--run-name", "t")
    assert result.exit_code == 0, result.output
    run = tmp_path / "runs" / "qm9_tiny" / "t"
    evals = [
        r
        for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
        if r.get("kind") == "eval"
    ]
    assert [r["step"] for r in evals] == [3, 6]
    expected = {"eval/val_std_mae", "eval/test_std_mae"} | {
        f"eval/test_mae_{t}" for t in ("mu", "u0", "cv")
    }
    assert expected <= set(evals[-1])


def test_compare_with_single_task_gives_delta_m_against_stl_and_sum(tmp_path, cli):
    recipe = _tiny_recipe(tmp_path)
    result = cli(
        "compare",
        recipe,
        "--methods",
        "sum,conductor,single-task",
        "--seeds",
        "2",
        "--name",
        "c",
        "--quiet",
    )
    assert result.exit_code == 0, result.output
    compare = tmp_path / "runs" / "qm9_tiny" / "compare-c"
    summary = json.loads((compare / "summary.json").read_text())
    assert [e["name"] for e in summary["entries"]] == ["sum", "conductor"]
    for task in ("mu", "u0", "cv"):
        saved = load_recipe(compare / "single-task" / task / "seed0" / "recipe.yaml")
        assert list(saved.losses) == [task] and saved.conductor.method == "sum"
    delta = summary["delta_m"]
    assert delta["metrics"] == {t: f"test_mae_{t}" for t in ("mu", "u0", "cv")}
    stl = delta["entries"]["single-task"]["selected"]["vs_single_task"]
    assert abs(stl["mean"]) < 1e-9  # the base is the mean of these very runs
    # Δm of sum against STL, by hand from the runs' selected evaluations.
    base = {
        t: sum(
            summary["single_task_runs"][t][s]["eval_selected"][f"eval/test_mae_{t}"]
            for s in ("0", "1")
        )
        / 2
        for t in ("mu", "u0", "cv")
    }
    for seed in ("0", "1"):
        run = summary["runs"]["sum"][seed]["eval_selected"]
        by_hand = 100 * sum((run[f"eval/test_mae_{t}"] - base[t]) / base[t] for t in base) / 3
        got = delta["entries"]["sum"]["selected"]["vs_single_task"]["values"][seed]
        assert got == pytest.approx(by_hand, rel=1e-12)
    assert "vs_sum" in delta["entries"]["conductor"]["final"]
    report = (compare / "report.md").read_text()
    assert "## Δm: all tasks in one number" in report and "Δm% vs STL (selected)" in report
    assert summary["plots"]["Each task against single-task learning"] == "task_change.png"
    assert (compare / "task_change.png").stat().st_size > 10_000


@pytest.mark.skipif(not HAS_QM9PACK, reason='qm9pack is not installed (pip install -e ".[qm9]")')
def test_the_real_package_holds_all_of_qm9_in_the_slices_format():
    files = qm9.source_files(qm9.qm9pack_data_dir())
    assert [f.name for f in files] == ["qm9_part1.csv", "qm9_part2.csv", "qm9_part3.csv"]
    real = _by_index(qm9.read_csv(files[0], limit=120))
    committed = _by_index(qm9.read_csv(SLICE / "qm9_part1.csv"))
    assert len(real) == 120 and real == {i: committed[i] for i in real}
    lines = 0
    for path in files:
        with path.open("rb") as handle:
            lines += sum(1 for _ in handle) - 1  # one molecule a line, after the header
    assert lines == 130_831

"""The option grammar the commands share: --methods, --variant, --grid, --baseline."""

import pytest

from gcond_cli.errors import UsageError
from gcond_cli.options import (
    parse_baselines,
    parse_grid,
    parse_methods,
    parse_variant,
    parse_variants,
    split_top_level,
)

VARIANT = "seed-momentum:conductor.momentum_beta=0.9,optimizer.betas=[0.0,0.95]"


def test_split_and_parse_variants() -> None:
    assert split_top_level("a=[0.0,0.95],b={x: 1, y: 2},c='p,q'") == [
        "a=[0.0,0.95]",
        "b={x: 1, y: 2}",
        "c='p,q'",
    ]
    name, overrides = parse_variant(VARIANT)
    assert name == "seed-momentum"
    assert overrides == ["conductor.momentum_beta=0.9", "optimizer.betas=[0.0,0.95]"]
    for bad in ("no-colon", "name:", ":a=1", "bad name:a=1", "v:a=1,oops"):
        with pytest.raises(UsageError):
            parse_variant(bad)
    assert parse_methods("conductor, sum,upgrad") == ["conductor", "sum", "upgrad"]
    with pytest.raises(UsageError, match="twice"):
        parse_methods("sum,sum")


def test_variants_are_named_once_and_not_like_a_method() -> None:
    assert parse_variants([VARIANT], ["sum"]) == {
        "seed-momentum": ["conductor.momentum_beta=0.9", "optimizer.betas=[0.0,0.95]"]
    }
    with pytest.raises(UsageError, match="same name"):
        parse_variants([VARIANT, VARIANT], ["sum"])
    with pytest.raises(UsageError, match="also a method"):
        parse_variants(["sum:optimizer.lr=1"], ["sum"])


def test_unknown_methods_get_a_suggestion() -> None:
    with pytest.raises(UsageError, match="did you mean 'pcgrad'"):
        parse_methods("conductor,pcgard")
    with pytest.raises(UsageError, match="expected comma-separated"):
        parse_methods(" , ")


def test_grid_values_name_directories() -> None:
    assert parse_grid(["data.lab.direction=0.5,0,-0.5", "data.lab.scale=1,100"]) == {
        "data.lab.direction": ["0.5", "0", "-0.5"],
        "data.lab.scale": ["1", "100"],
    }
    with pytest.raises(UsageError, match="twice"):
        parse_grid(["a=1", "a=2"])
    with pytest.raises(UsageError, match="expected KEY=V1,V2"):
        parse_grid(["a="])
    with pytest.raises(UsageError, match="cannot name a directory"):
        parse_grid(["optimizer.betas=[0.9,0.99],[0,0.95]"])


def test_several_baselines() -> None:
    entries = ["conductor", "sum", "sum-log", "my-variant"]
    assert parse_baselines("sum", entries) == ["sum"]
    assert parse_baselines("sum, sum-log", entries) == ["sum", "sum-log"]
    assert parse_baselines("my-variant,sum", entries) == ["my-variant", "sum"]
    with pytest.raises(UsageError, match="did you mean 'sum-log'"):
        parse_baselines("sum,sum-lg", entries)
    with pytest.raises(UsageError, match="twice"):
        parse_baselines("sum,sum", entries)
    with pytest.raises(UsageError, match="expected a method"):
        parse_baselines(",", entries)

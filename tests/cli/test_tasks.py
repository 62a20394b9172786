"""What the user's evaluation returns, checked: names (a leading eval/ accepted) and numbers."""

import pytest
import torch

from gcond_cli.errors import ComponentError
from gcond_cli.tasks import checked_metrics


def test_metric_names_with_or_without_the_eval_prefix() -> None:
    result = checked_metrics({"eval/mae": 0.5, "score": torch.tensor(2.0)}, "eval (x)")
    assert result == {"mae": 0.5, "score": 2.0}


@pytest.mark.parametrize(
    ("result", "message"),
    [
        ({"mae": 1.0, "eval/mae": 2.0}, "twice"),
        ({"eval/bad-name": 1.0}, "'eval/bad-name'; expected names of letters"),
        ({"eval/eval/mae": 1.0}, "expected names of letters"),
        ({"mae": "high"}, "expected a float"),
        ([0.5], "expected a dict"),
    ],
)
def test_bad_metrics_are_refused(result, message) -> None:
    with pytest.raises(ComponentError, match=message):
        checked_metrics(result, "eval (x)")

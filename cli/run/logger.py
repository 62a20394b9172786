"""Run reporting: the one object through which the training loop talks to the user.

`RunLogger` feeds three sinks, each optional:

* the console: a rich live view (progress bar + table of the latest statistics) on a terminal,
  one plain line per logged step when the output is a pipe or a file;
* TensorBoard event files written straight into the run directory (no sub-runs);
* ``metrics.jsonl`` (one JSON object per logged step or eval) and ``summary.json`` at the end.

Per-step cost is a few dictionary writes plus the TensorBoard/JSON writes: the live view is redrawn
by rich's own refresh thread (4 Hz) from the latest values, never from the loop.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import IO, Any

import torch
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table

from .files import METRICS_FILE, MIN_COSINE, SUMMARY_FILE
from .tensorboard import (
    custom_layout,
    flatten_hparams,
    image_grid,
    numeric_leaves,
)
from .writing import drop_entries_after, json_safe, write_json_atomic

__all__ = ["RunLogger"]


class RunLogger:
    """Reports a training run to the console, TensorBoard and ``metrics.jsonl``.

    Args:
        run_dir: directory that receives ``metrics.jsonl``, the TensorBoard events and
            ``summary.json``; None writes no files (non-zero ranks, dry runs).
        recipe_dict: the resolved recipe as a plain nested dict; written as hyper-parameters.
        total_steps: number of optimizer steps of the whole run (the progress bar's total).
        console: print anything at all (False on non-zero ranks).
        tensorboard: write TensorBoard events (needs ``run_dir``).
        live: True forces the rich live view, False forces plain lines, None picks the live view
            only when stdout is a terminal.

    Steps are counted as completed optimizer steps: ``start(s)`` means s steps are already done
    (0 for a fresh run) and the next ``log_step`` reports step s + 1 or later.
    """

    def __init__(
        self,
        run_dir: Path | None,
        recipe_dict: dict,
        total_steps: int,
        *,
        console: bool = True,
        tensorboard: bool = True,
        live: bool | None = None,
    ) -> None:
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.total_steps = total_steps
        self._recipe = recipe_dict
        self._use_tensorboard = tensorboard and self.run_dir is not None
        self._live_mode = console and (_stdout_is_terminal() if live is None else live)
        # Plain mode lets rich detect the stream, so a pipe gets no ANSI codes; live mode on a
        # non-terminal (live=True under a pipe) has to insist on one.
        self._console = Console(force_terminal=True if live else None) if console else None

        self._writer: Any = None  # SummaryWriter, imported lazily (TensorBoard is slow to import)
        self._jsonl: IO[str] | None = None
        self._live: Live | None = None
        self._started = False
        self._closed = False

        # Latest values only, replaced (never mutated) on each call so that the live view's
        # refresh thread always reads a consistent snapshot. Nothing grows with the run length.
        self._step = 0
        self._stats: dict[str, float] = {}
        self._lr = 0.0
        self._samples_per_s = 0.0
        self._eval_step: int | None = None
        self._eval: dict[str, float] = {}
        self._skipped_total = 0
        self._scalar_tags: set[str] = set()
        # Throughput reference, taken at the first logged step so that warm-up and compilation
        # in step one do not inflate the ETA for the rest of the run.
        self._rate_origin: tuple[int, float] | None = None

    # ------------------------------------------------------------------ lifecycle

    def start(self, start_step: int = 0) -> None:
        """Open the run's files and the live view; ``start_step`` steps are already done."""
        if self._started:
            return
        self._started = True
        self._step = start_step
        if self.run_dir is not None:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            metrics_path = self.run_dir / METRICS_FILE
            if start_step > 0:
                drop_entries_after(metrics_path, start_step)
            # Line-buffered: each record reaches the OS as soon as it is written, so a crash
            # loses at most the line being written.
            self._jsonl = open(metrics_path, "a", buffering=1, encoding="utf-8")  # noqa: SIM115
        if self._use_tensorboard:
            self._open_tensorboard(start_step)
        if self._live_mode:
            self._live = Live(
                console=self._console,
                refresh_per_second=4,
                get_renderable=self._render_live,
            )
            self._live.start()

    def close(self, summary: dict | None = None) -> None:
        """Write ``summary.json`` (when given) and the final hyper-parameter record, then close."""
        self._close(summary, failed=False)

    def __enter__(self) -> RunLogger:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._close(None, failed=exc_type is not None)

    # ------------------------------------------------------------------ reporting

    def log_step(
        self,
        step: int,
        stats: Mapping[str, float],
        lr: float,
        samples_per_s: float,
        step_seconds: float | None = None,
    ) -> None:
        """Report the statistics of one optimizer step (a dict as returned by the method)."""
        self._require_started()
        stats = {k: _scalar(v) for k, v in stats.items()}
        now = time.perf_counter()
        if self._rate_origin is None:
            self._rate_origin = (step, now)
        self._stats, self._lr, self._samples_per_s = stats, float(lr), float(samples_per_s)
        self._step = step
        self._skipped_total += int(stats.get("skipped", 0.0) > 0)

        if self._jsonl is not None:
            # The method's own "step" counter would clash with the loop's; the loop's one wins.
            record = {"step": step, "kind": "train"}
            record.update((k, v) for k, v in stats.items() if k != "step")
            record.update(lr=self._lr, samples_per_s=self._samples_per_s)
            if step_seconds is not None:
                record["step_s"] = float(step_seconds)
            self._write_record(record)
        if self._writer is not None:
            scalars = {**stats, "train/lr": self._lr, "train/samples_per_s": self._samples_per_s}
            for tag, value in scalars.items():
                self._writer.add_scalar(tag, value, step)
            self._scalar_tags.update(scalars)
        if self._console is not None and self._live is None:
            self._print(self._step_line(step, stats))

    def log_eval(
        self,
        step: int,
        metrics: Mapping[str, float],
        images: Mapping[str, torch.Tensor] | None = None,
    ) -> None:
        """Report evaluation metrics (keys as TensorBoard tags, e.g. ``eval/ssim``) and images.

        ``images`` maps a name to a B×3×H×W batch in [0, 1]; each becomes the grid
        ``images/<name>``.
        """
        self._require_started()
        metrics = {k: _scalar(v) for k, v in metrics.items()}
        self._eval_step, self._eval = step, metrics

        if self._jsonl is not None:
            self._write_record({"step": step, "kind": "eval", **metrics})
        if self._writer is not None:
            for tag, value in metrics.items():
                self._writer.add_scalar(tag, value, step)
            self._scalar_tags.update(metrics)
            for name, batch in (images or {}).items():
                self._writer.add_image(f"images/{name}", image_grid(batch), step)
        if self._console is not None:
            # Printed in live mode too: it lands above the live view and keeps the eval history.
            self._print(f"eval step {step} | {_format_metrics(metrics)}")

    def info(self, msg: str) -> None:
        """Print a message for the user."""
        if self._console is not None:
            self._print(msg)

    def warn(self, msg: str) -> None:
        """Print a warning (yellow on a terminal, prefixed ``warning:``)."""
        if self._console is not None:
            self._print(f"warning: {msg}", style="yellow")

    def error(self, msg: str) -> None:
        """Print an error (red on a terminal, prefixed ``error:``)."""
        if self._console is not None:
            self._print(f"error: {msg}", style="bold red")

    # ------------------------------------------------------------------ internals

    def _require_started(self) -> None:
        if not self._started:
            raise RuntimeError("RunLogger.start() must be called before logging steps or evals")

    def _open_tensorboard(self, start_step: int) -> None:
        from torch.utils.tensorboard import SummaryWriter
        from torch.utils.tensorboard.summary import hparams

        assert self.run_dir is not None
        # purge_step: on resume, TensorBoard drops what a stopped run logged after the
        # checkpoint it resumes from, so no curve shows the same steps twice.
        self._writer = SummaryWriter(
            log_dir=str(self.run_dir),
            purge_step=start_step + 1 if start_step > 0 else None,
            flush_secs=30,
        )
        if start_step > 0:
            return  # the layout and hyper-parameters are already in the first events file
        self._writer.add_custom_scalars(custom_layout(self._loss_names()))
        # Written through the run's own file writer: SummaryWriter.add_hparams would open a
        # separate sub-run. The session start goes out now so a crashed run still shows its
        # hyper-parameters; the experiment record (with metric names) and the end go at close.
        _, session_start, _ = hparams(flatten_hparams(self._recipe), {})
        self._writer.file_writer.add_summary(session_start)

    def _close(self, summary: dict | None, *, failed: bool) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            if self._live is not None:
                self._live.stop()  # draws the final state once more and leaves it on screen
            if summary is not None and self.run_dir is not None:
                self.run_dir.mkdir(parents=True, exist_ok=True)
                write_json_atomic(self.run_dir / SUMMARY_FILE, summary)
        finally:
            if self._writer is not None:
                self._write_final_hparams(summary, failed=failed)
                self._writer.close()
            if self._jsonl is not None:
                self._jsonl.close()

    def _write_final_hparams(self, summary: dict | None, *, failed: bool) -> None:
        from torch.utils.tensorboard.summary import hparams

        metrics = numeric_leaves(summary) if summary is not None else dict(self._eval)
        # The hparams plugin reads a metric's value from the scalar of the same tag in the run.
        for tag, value in metrics.items():
            if tag not in self._scalar_tags:
                self._writer.add_scalar(tag, value, self._step)
        experiment, _, session_end = hparams(flatten_hparams(self._recipe), metrics)
        self._writer.file_writer.add_summary(experiment)
        if not failed:
            # hparams() can only mark a session successful; a failed run leaves it open instead.
            self._writer.file_writer.add_summary(session_end)

    def _loss_names(self) -> list[str]:
        losses = self._recipe.get("losses")
        return list(losses) if isinstance(losses, Mapping) else []

    def _write_record(self, record: dict) -> None:
        assert self._jsonl is not None
        self._jsonl.write(json.dumps(json_safe(record), allow_nan=False) + "\n")

    def _print(self, text: str, style: str | None = None) -> None:
        assert self._console is not None
        # markup=False: messages may contain brackets; soft_wrap: never break a log line.
        self._console.print(text, style=style, markup=False, highlight=False, soft_wrap=True)

    def _rate(self, step: int) -> float | None:
        """Optimizer steps per second since the first logged step (None until two were logged)."""
        if self._rate_origin is None:
            return None
        origin_step, origin_time = self._rate_origin
        elapsed = time.perf_counter() - origin_time
        if step <= origin_step or elapsed <= 0:
            return None
        return (step - origin_step) / elapsed

    def _eta(self, step: int) -> str:
        rate = self._rate(step)
        if rate is None:
            return "?"
        return _format_duration(max(self.total_steps - step, 0) / rate)

    def _step_line(self, step: int, stats: dict[str, float]) -> str:
        parts = [f"step {step}/{self.total_steps}"]
        per_loss = _loss_values(stats)
        if "loss/total" in stats:
            detail = ", ".join(f"{name} {_num(v)}" for name, v in per_loss.items())
            parts.append(f"loss {stats['loss/total']:.4f}" + (f" ({detail})" if detail else ""))
        if MIN_COSINE in stats:
            parts.append(f"min_cos {stats[MIN_COSINE]:.2f}")
        if (zones := _zones(stats)) is not None:
            parts.append(f"zones w/m/c {zones}")
        if (harm := _lowest(stats, "harm_z/")) is not None:
            parts.append(f"harm_z {harm:.1f}")
        if "final_grad_norm" in stats:
            parts.append(f"gnorm {_num(stats['final_grad_norm'], 3)}")
        if stats.get("skipped", 0.0) > 0:
            parts.append("skipped (non-finite gradients)")
        parts.append(f"lr {self._lr:.1e}")
        parts.append(f"{self._samples_per_s:.0f} samples/s")
        parts.append(f"eta {self._eta(step)}")
        return " | ".join(parts)

    def _render_live(self) -> RenderableType:
        """Build the live view from the latest snapshot (runs on rich's refresh thread)."""
        step, stats = self._step, self._stats
        rate = self._rate(step)
        header = Table.grid(padding=(0, 2))
        header.add_row(
            ProgressBar(total=max(self.total_steps, 1), completed=step, width=40),
            f"{step}/{self.total_steps}",
            f"{rate:.2f} it/s" if rate is not None else "- it/s",
            f"eta {self._eta(step)}",
        )

        table = Table.grid(padding=(0, 2))
        table.add_column(style="bold")
        table.add_column()
        if "loss/total" in stats:
            losses = {"total": stats["loss/total"], **_loss_values(stats)}
            table.add_row("loss", "  ".join(f"{k} {_num(v)}" for k, v in losses.items()))
        if MIN_COSINE in stats:
            table.add_row("min cosine", f"{stats[MIN_COSINE]:.3f}")
        if (zones := _zones(stats)) is not None:
            table.add_row("zones w/m/c", zones)
        for title, prefix in (("signal cos", "signal_cos/"), ("harm z", "harm_z/")):
            values = _family(stats, prefix)
            if values:
                table.add_row(title, "  ".join(f"{k} {v:.2f}" for k, v in values.items()))
        wins = {k.removeprefix("wins/"): v for k, v in stats.items() if k.startswith("wins/")}
        if wins:
            table.add_row("wins", "  ".join(f"{k} {v:.0f}" for k, v in wins.items()))
        if "final_grad_norm" in stats:
            table.add_row("grad norm", _num(stats["final_grad_norm"]))
        if "skipped" in stats:
            table.add_row("skipped", f"{stats['skipped']:.0f} (run total {self._skipped_total})")
        if stats:
            table.add_row("lr", f"{self._lr:.2e}")
            table.add_row("samples/s", f"{self._samples_per_s:.0f}")
        if self._eval_step is not None:
            table.add_row(f"eval @ {self._eval_step}", _format_metrics(self._eval))
        return Group(header, table)


# ---------------------------------------------------------------------- helpers


def _stdout_is_terminal() -> bool:
    isatty = getattr(sys.stdout, "isatty", None)  # test runners may swap in bare file objects
    return bool(isatty and isatty())


def _scalar(value: Any) -> float:
    """Python number for a stat; ints (counts) stay ints so metrics.jsonl reads naturally."""
    return value if isinstance(value, int | float) else float(value)


def _num(value: float, digits: int = 4) -> str:
    return f"{value:.{digits}g}"


def _loss_values(stats: Mapping[str, float]) -> dict[str, float]:
    """Per-loss values (``loss/<name>``), without the total."""
    return {
        k.removeprefix("loss/"): v
        for k, v in stats.items()
        if k.startswith("loss/") and k != "loss/total"
    }


def _family(stats: Mapping[str, float], prefix: str) -> dict[str, float]:
    """``{name: value}`` of the finite statistics under ``prefix``."""
    return {
        k.removeprefix(prefix): v
        for k, v in stats.items()
        if k.startswith(prefix) and math.isfinite(v)
    }


def _lowest(stats: Mapping[str, float], prefix: str) -> float | None:
    """The lowest finite statistic under ``prefix`` (None without one)."""
    values = _family(stats, prefix).values()
    return min(values) if values else None


def _zones(stats: Mapping[str, float]) -> str | None:
    keys = ("conflicts/weak", "conflicts/main", "conflicts/critical")
    if not all(k in stats for k in keys):
        return None
    return "/".join(f"{stats[k]:.0f}" for k in keys)


def _format_metrics(metrics: Mapping[str, float]) -> str:
    return " | ".join(f"{k.removeprefix('eval/')} {_num(v)}" for k, v in metrics.items())


def _format_duration(seconds: float) -> str:
    seconds = round(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"

"""A run: its parts built from a recipe (``parts.py``), the `Run` that takes one optimizer step
(``build.py``), the loop that trains it (``loop.py``), opening or resuming its directory and
training it to the end (``open.py``), its checkpoints, logger, distributed context, and the
names and readers of its files (``files.py``).

Import the modules themselves (``from gcond_cli.run.open import open_run``): this package
imports nothing, so reading a run's files (``files.py``) does not import torch.
"""

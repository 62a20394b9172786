"""``gcond compare``: its plan (``plan.py``), the runs (``runner.py``), what they found
(``results.py``, ``verdict.py``), and the report (``report.py``, ``console.py``, ``plots.py``).
The command is `runner.run_compare`.
"""

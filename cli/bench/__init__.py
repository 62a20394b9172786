"""``gcond bench``: the workloads (``workloads.py``), the meters (``meters.py``), the runs timed
over a `Run` (``runner.py``) and the report (``report.py``). The command is `runner.run_bench`.
"""

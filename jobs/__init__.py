"""Ray job entry points: `jobs.convert` (shard conversion). Training and evaluation jobs follow.

Each module can be run as `python -m jobs.<name>` by `ray job submit`; MLflow tracking lives here.
"""

"""Batch-script templates, shipped in the wheel as ``hpc_serverless.jobscripts``.

They stay dumb: plain @SLOTS@ filled by :mod:`hpc_serverless.adapters.jobscript`, which quotes
every value. Conditionals live in Python.
"""

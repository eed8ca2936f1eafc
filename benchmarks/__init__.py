"""Micro-benchmarks of the aggregation math (part of `bench perf`): no models, no data, CPU tensors.

Every figure is a measurement in the process that reports it, next to a baseline measured in the
same process; nothing here is a timed test (tests/test_benchmarks_smoke.py checks only the outputs).
"""

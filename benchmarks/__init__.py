"""Measurements. `bench perf` (benchmarks/cli.py) times the aggregation math on CPU tensors, the engine loop, local
training, batched clients and a Flower-simulation round; the long runs behind the docs' figures load real models and
data (eval_full, eval_floor, eval_backends, eval_dtype, vllm_soak, dp_noise, and the study grids study.sh and
study_v2.sh); scale_plan works the measured per-module figures up to Llama-7B on paper.

Every figure is a measurement in the process that reports it, next to a baseline measured in the
same process; nothing here is a timed test (tests/test_benchmarks_smoke.py checks only the outputs).
"""

"""Benchmark building blocks shared by the ``tools/bench_*.py`` scripts (timers, baselines)."""

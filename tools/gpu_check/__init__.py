"""Standalone GPU check of the semoe CUDA launchers (no Paddle needed); see README.md.

Modules: native (build + ctypes shim), reference (NumPy contract), cases (correctness),
timing (bandwidth timings), check (command line).
"""

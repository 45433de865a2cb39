"""The parallel wing: the parallel runtime: data, tensor and pipeline parallelism, launching workers, the distributed optimizer, O2's main parameters, recomputation, sequence parallelism.

Fixtures every wing shares are in tests/conftest.py; code two test files share is in
tests/helpers."""

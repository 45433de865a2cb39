"""The checkpoints wing: checkpoints and interop: the store, mega's archive, Hugging Face, Megatron-LM, megatron-core torch_dist, NeMo archives, the converter structure.

Fixtures every wing shares are in tests/conftest.py; code two test files share is in
tests/helpers."""

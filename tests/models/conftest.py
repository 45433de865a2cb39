"""The models wing: the model families against their references: GPT, Megatron-BERT, T5/BART and the hiddens, Transformer-XL; compilation, the chunked loss, benchmarks run in their tiny modes.

Fixtures every wing shares are in tests/conftest.py; code two test files share is in
tests/helpers."""

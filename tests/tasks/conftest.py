"""The tasks wing: downstream fine-tuning: every task's reader, training, metrics, archive and predictions.

Fixtures every wing shares are in tests/conftest.py; code two test files share is in
tests/helpers."""

"""The docs wing: every command printed in the README and docs, run (shortened).

Fixtures every wing shares are in tests/conftest.py; code two test files share is in
tests/helpers."""

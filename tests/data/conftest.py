"""The data wing: data sources and tokenizers: text, indexed and other document formats, packing, objectives, BERT samples, WordPiece and word vocabularies.

Fixtures every wing shares are in tests/conftest.py; code two test files share is in
tests/helpers."""

"""The metrics downstream results are published with, computed exactly as their reference
definitions: the official SQuAD v1.1 / v2.0 evaluation, NeMo's ClassificationReport and
seqeval's entity-level scores. Pure Python: no model, no torch."""

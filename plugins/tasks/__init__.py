"""Downstream fine-tuning tasks (question answering, text and token classification,
relation extraction, multiple choice): file readers, the features a BERT head trains on,
the published metrics, and the task objects registered through `register_tasks`."""

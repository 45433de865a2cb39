"""Local lm-evaluation-harness tasks (task YAMLs and their JSONL data) the harness tests and docs rows score on."""
from __future__ import annotations

import json
import random
from pathlib import Path

from mega.testing import WORDS


def write_tasks(directory: Path, choice_words: int = 4) -> Path:
    """Three local tasks (multiple choice with answers of up to `choice_words` words,
    rolling log-likelihood, generation) over JSONL files of the corpus's words; returns the
    folder to pass as the include path."""
    rng = random.Random(7)
    directory.mkdir(parents=True, exist_ok=True)

    def phrase(n):
        return " ".join(rng.choice(WORDS) for _ in range(n))

    choice = [{"question": phrase(rng.randint(3, 12)), "choices": [phrase(rng.randint(1, choice_words)) for _ in range(4)],
               "answer": rng.randint(0, 3)} for _ in range(16)]
    rolling = [{"text": phrase(n)} for n in (5, 20, 90, 160)]  # the long ones span several 64-token windows
    generate = [{"prompt": phrase(rng.randint(2, 10)), "target": phrase(2)} for _ in range(6)]
    for name, rows in (("choice", choice), ("rolling", rolling), ("generate", generate)):
        (directory / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    for name, text in (("choice", CHOICE_YAML), ("rolling", ROLLING_YAML), ("generate", GENERATE_YAML)):
        (directory / f"{name}.yaml").write_text(text.format(data=directory))
    return directory


CHOICE_YAML = """task: mega_toy_choice
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}/choice.jsonl
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
  - metric: acc_norm
"""


ROLLING_YAML = """task: mega_toy_rolling
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}/rolling.jsonl
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
"""


GENERATE_YAML = """task: mega_toy_generate
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}/generate.jsonl
test_split: test
output_type: generate_until
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{target}}}}"
generation_kwargs:
  until: ["\\n", "."]
  max_gen_toks: 8
  do_sample: false
metric_list:
  - metric: exact_match
"""

"""lm-evaluation-harness: the `mega` model scores a checkpoint as lm-eval's own Hugging Face
backend (`hf`) scores the same GPT exported with `mega export --to huggingface`, request by
request (log-likelihoods, greedy flags, rolling log-likelihoods, generations) and in the
metrics (accuracy, perplexities, exact match), on local tasks this test writes (task
YAMLs and JSONL files, no download); `lm_eval --model mega` on the command line and
`mega evaluate RUN --harness` give the same; a checkpoint trained under tensor or
pipeline parallelism is gathered into one process and scored alike."""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("lm_eval")

from mega.cli import main  # noqa: E402
from mega.testing import WORDS, TinyExperiment, write_corpus  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
EOT = "<|endoftext|>"
TASKS = ["mega_toy_choice", "mega_toy_rolling", "mega_toy_generate"]
OFFLINE = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}

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


def bpe_tokenizer(directory: Path, corpus: Path) -> Path:
    """A small byte-level BPE (GPT-2's kind) with <|endoftext|>, as tokenizer.json."""
    from tokenizers import ByteLevelBPETokenizer

    tok = ByteLevelBPETokenizer()
    tok.train_from_iterator(corpus.read_text().splitlines(), vocab_size=300, min_frequency=2, special_tokens=[EOT],
                            show_progress=False)
    tok.save(str(directory / "tokenizer.json"))
    return directory / "tokenizer.json"


GPT = {"seq_length": 64, "hidden_dropout": 0.0, "attention_dropout": 0.0, "micro_batch_size": 4,
       "optim": {"lr": 3e-3, "sched": {"name": "cosine", "warmup_steps": 2}}}


@pytest.fixture(scope="module")
def offline():
    with pytest.MonkeyPatch.context() as mp:
        for k, v in OFFLINE.items():
            mp.setenv(k, v)
        yield


@pytest.fixture(scope="module")
def setup(tmp_path_factory, offline):
    """A tiny GPT with a BPE tokenizer trained 12 steps, its Hugging Face export, the tasks."""
    tmp = tmp_path_factory.mktemp("lm_eval")
    corpus = write_corpus(tmp / "corpus.txt", lines=200)
    tokenizer = bpe_tokenizer(tmp, corpus)
    exp = TinyExperiment(tmp, corpus)
    run = exp.run(trainer={"max_steps": 12, "val_check_interval": 0},
                  model={**GPT, "tokenizer": {"library": "huggingface", "tokenizer_file": str(tokenizer)}})
    assert main(["export", str(run.run_dir), str(tmp / "hf"), "--to", "huggingface"]) == 0
    return {"tmp": tmp, "run": run.run_dir, "hf": tmp / "hf", "tasks": write_tasks(tmp / "tasks"),
            "tokenizer": tokenizer, "exp": exp}


def evaluate(model: str, model_args: str, tasks_dir: Path, batch_size: int = 1, tasks=TASKS) -> dict:
    import lm_eval
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(tasks_dir), include_defaults=False)  # lm-eval's own tasks: not indexed
    return lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=list(tasks), batch_size=batch_size,
                                   device="cpu", task_manager=manager, log_samples=True)


def responses(results: dict, task: str) -> list:
    """Per document (in order): each request's filtered response."""
    return [[r for r in s["filtered_resps"]] for s in sorted(results["samples"][task], key=lambda s: s["doc_id"])]


@pytest.fixture(scope="module")
def hf_results(setup):
    return evaluate("hf", f"pretrained={setup['hf']},dtype=float32", setup["tasks"])


def assert_same_scores(ours: dict, theirs: dict, tasks=TASKS) -> None:
    for task in tasks:
        a, b = responses(ours, task), responses(theirs, task)
        assert len(a) == len(b) > 0, task
        for doc_a, doc_b in zip(a, b):
            assert len(doc_a) == len(doc_b)
            for ra, rb in zip(doc_a, doc_b):
                if isinstance(rb, str):  # generate_until
                    assert ra == rb, task
                elif isinstance(rb, (list, tuple)):  # loglikelihood: (log-probability, is greedy)
                    assert float(ra[0]) == pytest.approx(float(rb[0]), rel=1e-5, abs=1e-4), task
                    assert bool(ra[1]) == bool(rb[1]), task
                else:  # loglikelihood_rolling: the summed log-probability
                    assert float(ra) == pytest.approx(float(rb), rel=1e-5, abs=1e-4), task
        for metric, value in theirs["results"][task].items():
            if metric.endswith(",none") and "stderr" not in metric:
                assert ours["results"][task][metric] == pytest.approx(value, rel=1e-5), (task, metric)


@pytest.mark.slow
def test_the_mega_model_scores_as_lm_evals_hf_backend_on_the_export(setup, hf_results):
    ours = evaluate("mega", f"run={setup['run']}", setup["tasks"], batch_size=5)  # batches with padding
    assert_same_scores(ours, hf_results)
    # the tasks are not degenerate: a real accuracy, several rolling windows, text generated
    acc = hf_results["results"]["mega_toy_choice"]["acc,none"]
    assert 0 < acc < 1
    assert any(r[0] for r in responses(hf_results, "mega_toy_generate"))
    greedy = [r[1] for doc in responses(hf_results, "mega_toy_choice") for r in doc]
    assert any(greedy) or not all(greedy)


def _lm_eval_cli(args, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, **OFFLINE}
    return subprocess.run([str(Path(sys.executable).parent / "lm_eval"), *map(str, args)], capture_output=True, text=True,
                          timeout=600, cwd=cwd, env=env)


@pytest.mark.slow
def test_lm_evals_own_command_line_knows_the_mega_model(setup, hf_results, tmp_path):
    r = _lm_eval_cli(["--model", "mega", "--model_args", f"run={setup['run']}", "--tasks", "mega_toy_choice",
                      "--include_path", setup["tasks"], "--batch_size", "4", "--device", "cpu", "--output_path",
                      tmp_path / "out"], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    (written,) = (tmp_path / "out").rglob("results_*.json")
    acc = json.loads(written.read_text())["results"]["mega_toy_choice"]["acc,none"]
    assert acc == pytest.approx(hf_results["results"]["mega_toy_choice"]["acc,none"])


@pytest.mark.slow
def test_mega_evaluate_harness_is_the_short_form(setup, hf_results, capsys):
    assert main(["evaluate", str(setup["run"]), "--harness", "mega_toy_choice,mega_toy_rolling", "--include-path",
                 str(setup["tasks"]), "--batch-size", "3", "--device", "cpu"]) == 0
    printed = json.loads(capsys.readouterr().out)
    saved = json.loads((setup["run"] / "eval_harness.json").read_text())
    assert saved["tasks"] == ["mega_toy_choice", "mega_toy_rolling"] and saved["results"] == printed
    for task in ("mega_toy_choice", "mega_toy_rolling"):
        for metric, value in hf_results["results"][task].items():
            if metric.endswith(",none") and "stderr" not in metric:
                assert saved["results"][task][metric] == pytest.approx(value, rel=1e-5), (task, metric)


def test_harness_errors_name_what_to_fix(setup, monkeypatch, capsys):
    run = str(setup["run"])
    assert main(["evaluate", run, "--harness", "no_such_task_xyz", "--include-path", str(setup["tasks"])]) == 2
    assert "--harness: unknown lm-eval task(s) no_such_task_xyz" in capsys.readouterr().err
    assert main(["evaluate", run, "--harness", "mega_toy_choice", "trainer.devices=2"]) == 2
    assert "--harness runs in one process" in capsys.readouterr().err
    assert main(["evaluate", run, "--harness", "mega_toy_choice", "model.no_such_key=1"]) == 2
    assert "model.no_such_key" in capsys.readouterr().err
    from mega.plugins.harness.lm_eval_model import MegaLM

    with pytest.raises(Exception, match="unknown argument.*pretrained"):
        MegaLM(run=run, pretrained="gpt2")
    with pytest.raises(Exception, match="give the checkpoint as run=RUN_DIR"):
        MegaLM()
    with pytest.raises(Exception, match="a continuation of 3 tokens does not fit the model's 2 positions"):
        MegaLM(run=run, max_length=2)._loglikelihood_tokens([(("a", "bcd"), [1], [2, 3, 4])])
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # as if not installed
    assert main(["evaluate", run, "--harness", "mega_toy_choice"]) == 2
    assert "pip install 'mega-lm[lm_eval]'" in capsys.readouterr().err


def _mega(args, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, **OFFLINE}
    env.pop("RANK", None)
    return subprocess.run([sys.executable, "-m", "mega", *map(str, args)], capture_output=True, text=True, timeout=300,
                          cwd=cwd, env=env)


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["model.tensor_model_parallel_size=2", "model.pipeline_model_parallel_size=2"],
                         ids=["tp2", "pp2"])
def test_a_checkpoint_trained_in_parallel_is_gathered_and_scored_alike(setup, tmp_path, layout):
    exp = setup["exp"]
    name = layout.split(".")[1].split("_")[0]
    toml = exp.toml(f"{name}.toml", trainer={"max_steps": 4, "val_check_interval": 0, "devices": 2, "accelerator": "cpu"},
                    model={**GPT, "tokenizer": {"library": "huggingface", "tokenizer_file": str(setup["tokenizer"])}},
                    exp_manager={"name": name})
    r = _mega(["run", toml, layout], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    run_dir = exp.run_dir(name)
    assert main(["export", str(run_dir), str(tmp_path / "hf"), "--to", "huggingface"]) == 0
    tasks = ["mega_toy_choice"]
    theirs = evaluate("hf", f"pretrained={tmp_path / 'hf'},dtype=float32", setup["tasks"], tasks=tasks)
    ours = evaluate("mega", f"run={run_dir}", setup["tasks"], batch_size=4, tasks=tasks)
    assert_same_scores(ours, theirs, tasks)

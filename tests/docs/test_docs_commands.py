"""Every `mega ...` command the README, docs/*.md and the examples' comments show is run
here, shortened, so the documentation stays true.

`COMMANDS` below is the explicit table: each command, exactly as the docs write it (its
trailing `# comment` dropped, spaces collapsed), says how it is shortened (what is appended:
a tiny model, 2 steps, the test corpus) and what it needs first (a trained run, an archive,
a Hugging Face directory, ...). A command in the docs that the table does not cover fails
`test_doc_command` (add a row); a row no document shows any more fails
`test_the_table_has_no_stale_rows`. Usage lines with placeholders (`mega import SOURCE
RUN_DIR [--from FORMAT]`) are checked against the parser: the subcommand and every `--flag`
must exist. `torchrun ... -m mega ...` and `srun mega ...` lines are parsed, not run. A command the docs show
with its output (`$ mega ...` followed by lines) must print that output (a line ending in
"..." is a prefix).

Commands run in-process (`mega.cli.main`) in one scratch directory per module, in which
`examples/` links to the repository's, so the docs' relative paths (`results/quickstart`,
`model.mega`) mean what they say.
"""
from __future__ import annotations

import re
import shlex
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import pytest

from mega.cli import _parser, main
from mega.plugins.tasks.toy_tasks import write_tasks
from mega.testing import write_corpus

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *sorted((ROOT / "examples").glob("*.toml"))]


# --- extracting the commands ----------------------------------------------------------------

@dataclass
class DocCommand:
    where: str                       # file:line
    text: str                        # the command, comment dropped, spaces collapsed
    output: List[str] = field(default_factory=list)  # the lines the docs show after `$ command`


def _strip_comment(line: str) -> str:
    """Drop a trailing shell comment (`#` after whitespace, outside quotes)."""
    quote = None
    for i, ch in enumerate(line):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i]
        # a backslash-escaped character needs no care here: the docs have none in commands
    return line


def _normal(text: str) -> str:
    return " ".join(_strip_comment(text).split())


def _is_command(stripped: str) -> bool:
    return stripped.startswith(("mega ", "$ mega ", "torchrun ", "srun mega ")) or stripped == "mega"


def _markdown_commands(path: Path) -> List[DocCommand]:
    lines = path.read_text().splitlines()
    found: List[DocCommand] = []
    fence: Optional[str] = None  # the fence's language while inside one
    i = 0
    while i < len(lines):
        line = lines[i]
        stripped = line.strip()
        if stripped.startswith("```"):
            fence = None if fence is not None else stripped[3:].strip()
            i += 1
            continue
        in_code = (fence is not None and fence not in ("python", "toml", "py")) or (
            fence is None and line.startswith("    "))  # an indented code block
        if not (in_code and _is_command(stripped)):
            i += 1
            continue
        start, indent = i, len(line) - len(line.lstrip())
        text = stripped
        # continuation lines: a trailing backslash, or (in a fence) a deeper-indented line
        while i + 1 < len(lines):
            nxt = lines[i + 1]
            if text.endswith("\\"):
                text = text[:-1] + " " + nxt.strip()
            elif fence is not None and nxt.strip() and len(nxt) - len(nxt.lstrip()) > indent \
                    and not _is_command(nxt.strip()):
                text = text + " " + nxt.strip()
            else:
                break
            i += 1
        output: List[str] = []
        if text.startswith("$ "):
            text = text[2:]
            while i + 1 < len(lines) and not lines[i + 1].strip().startswith(("$ ", "```")) and lines[i + 1].strip():
                output.append(lines[i + 1].strip())
                i += 1
        found.append(DocCommand(f"{path.relative_to(ROOT)}:{start + 1}", _normal(text), output))
        i += 1
    return found


def _toml_commands(path: Path) -> List[DocCommand]:
    found = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        m = re.match(r"#\s+(mega .*)$", line)
        if m:
            found.append(DocCommand(f"{path.relative_to(ROOT)}:{n}", _normal(m.group(1))))
    return found


def doc_commands() -> List[DocCommand]:
    out: List[DocCommand] = []
    for path in DOCS:
        out += _toml_commands(path) if path.suffix == ".toml" else _markdown_commands(path)
    return out


# --- how each command is shortened ----------------------------------------------------------

# A tiny GPT for 2 steps on the test corpus, its sentencepiece vocabulary 60 (so the .nemo
# helpers of test_archive fit it).
GPT = ("trainer.max_steps=2", "trainer.val_check_interval=2", "trainer.limit_val_batches=1", "model.num_layers=2",
       "model.hidden_size=32", "model.num_attention_heads=4", "model.seq_length=16", "model.max_position_embeddings=16",
       "model.micro_batch_size=2", "model.global_batch_size=4", "model.tokenizer.vocab_size=60",
       "model.optim.sched.warmup_steps=1")
DATA = ("model.data.data_prefix=[corpus.txt]",)
# The MIM / VAE encoder-decoder, as small.
BART = ("trainer.max_steps=2", "trainer.val_check_interval=2", "trainer.limit_val_batches=1", "model.micro_batch_size=2",
        "model.global_batch_size=2", "model.seq_length=32", "model.seq_length_dec=32", "model.encoder.hidden_steps=4",
        "model.encoder.num_layers=1", "model.encoder.hidden_size=32", "model.encoder.num_attention_heads=2",
        "model.decoder.num_layers=1", "model.decoder.hidden_size=32", "model.decoder.num_attention_heads=2",
        "model.hiddens.transform.q_z_given_x.hidden_size=32", "model.tokenizer.vocab_size=60",
        "model.optim.sched.warmup_steps=1", *DATA)
FEW_TOKENS = ("--max-new-tokens", "4")
# A tiny Transformer-XL for 2 steps, one process, fp32, word vocabulary of the test corpus.
TXL = ("trainer.max_steps=2", "trainer.val_check_interval=2", "trainer.limit_val_batches=1", "trainer.devices=1",
       "trainer.precision=32", "model.n_layer=1", "model.d_model=64", "model.n_head=2", "model.d_head=8",
       "model.d_inner=32", "model.tgt_len=8", "model.mem_len=8", "model.micro_batch_size=2", "model.global_batch_size=4",
       "model.cutoffs=[8,14,20]", "model.eval_tgt_len=8", "model.eval_mem_len=8", "model.eval_clamp_len=-1",
       "model.eval_batch_size=2", "model.optim.sched.warmup_steps=1")
WT103 = ("model.data.data_dir=wt103",)
# A tiny BERT for 2 steps on the quickstart corpus (the default data), a WordPiece vocabulary of 200;
# 64 positions, so the downstream tasks (sequences up to 64) fine-tune it.
BERT = ("trainer.max_steps=2", "trainer.val_check_interval=2", "trainer.limit_val_batches=1", "model.num_layers=2",
        "model.hidden_size=32", "model.num_attention_heads=4", "model.seq_length=32", "model.max_position_embeddings=64",
        "model.micro_batch_size=2", "model.global_batch_size=4", "model.tokenizer.vocab_size=200",
        "model.optim.sched.warmup_steps=1")
# The tiny Llama of examples/llama-tiny.toml, as small (4 query heads in 2 groups).
LLAMA = ("trainer.max_steps=2", "trainer.val_check_interval=2", "trainer.limit_val_batches=1", "model.num_layers=2",
         "model.hidden_size=32", "model.num_attention_heads=4", "model.num_query_groups=2", "model.ffn_hidden_size=48",
         "model.seq_length=16", "model.max_position_embeddings=64", "model.micro_batch_size=2",
         "model.global_batch_size=4", "model.tokenizer.vocab_size=60",
         "model.optim.sched.warmup_steps=1")
# The downstream tasks, 2 steps on top of the BERT above (results/bert).
TASK = ("trainer.max_steps=2", "trainer.val_check_interval=2", "trainer.limit_val_batches=1", "model.micro_batch_size=4")


@dataclass(frozen=True)
class Run:
    """Run the command with `extra` appended, after building `needs` (artifact names, see
    ARTIFACTS) and removing `fresh` (destinations the command creates); `replace` maps the
    docs' placeholders to real paths. `expect` checks (out, err, workspace)."""
    extra: Tuple[str, ...] = ()
    needs: Tuple[str, ...] = ()
    fresh: Tuple[str, ...] = ()
    replace: Tuple[Tuple[str, str], ...] = ()
    expect: Optional[Callable] = None
    slow: bool = False


SYNOPSIS = "synopsis"  # a usage line with placeholders: the subcommand and its --flags must exist
LAUNCH = "launch"      # torchrun ... -m mega ARGS: ARGS must parse


def _has(*words):
    def check(out, err, ws):
        for w in words:
            assert w in out, f"{w!r} not in the output:\n{out}"
    return check


def _file(name):
    def check(out, err, ws):
        assert (ws / name).exists(), f"{name} was not written"
    return check


COMMANDS: Dict[str, object] = {
    # README.md
    "mega run experiment.toml [dotted.key=value ...]": SYNOPSIS,
    "mega run examples/quickstart.toml": Run(GPT + DATA, needs=("corpus.txt",), expect=_file("results/quickstart/checkpoints")),
    "mega run examples/quickstart.toml trainer.max_steps=50 exp_manager.name=short": Run(GPT + DATA, needs=("corpus.txt",)),
    "mega run examples/quickstart.toml 'model.data.data_prefix=[0.7,a.txt,0.3,b.txt]' exp_manager.name=blended":
        Run(GPT, needs=("a.txt", "b.txt"), expect=_file("results/blended/checkpoints/step_0000002")),
    "mega run examples/quickstart.toml trainer.devices=2 trainer.accelerator=cpu exp_manager.name=dp2":
        Run(GPT + DATA, needs=("corpus.txt",), slow=True,  # (the only README DP=2 test)
            expect=_file("results/dp2/checkpoints/step_0000002")),
    "mega config examples/quickstart.toml trainer.precision=bf16": Run(expect=_has('precision = "bf16"')),
    "mega plugins": Run(expect=_has("gpt", "models: gpt")),
    'mega generate results/quickstart --prompt "The for statement" --top-k 40 --temperature 0.8':
        Run(FEW_TOKENS, needs=("results/quickstart",), expect=_has("for statement")),
    "mega run examples/quickstart.toml model.hiden_size=64": Run(),        # fails as the docs show
    "mega run exp.toml": Run(needs=("exp.toml",)),                            # idem
    "mega run examples/quickstart.toml model.optim.lr=-1": Run(),              # idem
    "mega plan examples/quickstart.toml --devices 4": Run(expect=_has("memory per rank", " TP  PP  DP")),
    "mega evaluate results/quickstart --split test": Run(needs=("results/quickstart",), expect=_has('"perplexity"')),
    # docs/plan.md
    "mega run examples/quickstart.toml model.seq_length=100000": Run(),        # refused, as the docs show
    "mega plan examples/quickstart.toml trainer.precision=bf16 model.megatron_amp_O2=true":
        Run(expect=_has("precision bf16 megatron_amp_O2", "18 bytes per parameter")),
    # docs/distributed-optimizer.md, examples/gpt-1.3b.toml
    "mega plan examples/gpt-1.3b.toml trainer.devices=8 --vocab-size 50257 --device cuda":
        Run(expect=_has("1.32B parameters", "megatron_amp_O2 + distributed optimizer", "7.5 bytes per parameter",
                        "model.optim.use_distributed_optimizer=false")),
    "mega plan examples/gpt-1.3b.toml trainer.devices=64 model.num_layers=44 model.hidden_size=6144"
    " model.num_attention_heads=64 model.tensor_model_parallel_size=8 --vocab-size 50257 --device cuda":
        Run(expect=_has("20.26B parameters", "TP=8 PP=1 DP=8", "state after step     17.78 GiB")),
    # docs/checkpoints.md
    "mega import SOURCE RUN_DIR [--from FORMAT] [--option KEY=VALUE ...]": SYNOPSIS,
    "mega export RUN_OR_CHECKPOINT DEST [--to FORMAT] [--option KEY=VALUE ...]": SYNOPSIS,
    "mega import SOURCE RUN_DIR [--from megatron] [--option tokenizer=bytes | --option tokenizer_model=PATH | --option"
    " vocab_file=PATH --option merges_file=PATH | --option tokenizer_file=PATH] [--option trust_pickle=true]": SYNOPSIS,
    "mega export RUN_OR_CHECKPOINT DEST --to megatron [--option tensor_parallel=N] [--option pipeline_parallel=M]":
        SYNOPSIS,
    "mega import ./gpt2-small results/gpt2": Run(needs=("gpt2-small",), fresh=("results/gpt2",),
                                                 expect=_has("imported")),
    "mega import ./gpt2-small results/gpt2 --from huggingface --option tokenizer_file=./tok/tokenizer.json":
        Run(needs=("gpt2-small", "tok/tokenizer.json"), fresh=("results/gpt2",), expect=_has("imported")),
    "mega export results/gpt2 ./gpt2-out --to huggingface": Run(needs=("results/gpt2",), fresh=("gpt2-out",),
                                                                expect=_file("gpt2-out/config.json")),
    "mega export results/gpt2 ./gpt2-out --to huggingface --option dtype=bfloat16":
        Run(needs=("results/gpt2",), fresh=("gpt2-out",), expect=_file("gpt2-out/config.json")),
    "mega export results/quickstart ./quickstart-hf --to huggingface":
        Run(needs=("results/quickstart",), fresh=("quickstart-hf",), expect=_file("quickstart-hf/tokenizer.json")),
    "mega import ./quickstart-hf results/quickstart-back": Run(needs=("quickstart-hf",), fresh=("results/quickstart-back",),
                                                               expect=_has("imported")),
    "mega export results/gpt model.mega": Run(needs=("results/gpt",), fresh=("model.mega",), expect=_file("model.mega")),
    "mega export results/gpt model.tar --to archive": Run(needs=("results/gpt",), fresh=("model.tar",),
                                                          expect=_file("model.tar")),
    'mega generate model.mega --prompt "Once upon"': Run(FEW_TOKENS, needs=("model.mega",), expect=_has("nce upon")),
    "mega import model.mega results/gpt-ft": Run(needs=("model.mega",), fresh=("results/gpt-ft",),
                                                 expect=_has("imported")),
    "mega import megatron_gpt.nemo results/from-nemo": Run(needs=("megatron_gpt.nemo",), fresh=("results/from-nemo",),
                                                           expect=_has("imported")),
    'mega generate megatron_gpt.nemo --prompt "..."': Run(FEW_TOKENS, needs=("megatron_gpt.nemo",)),
    "mega export results/from-nemo gpt_tp2.nemo --to nemo --option tensor_parallel=2":
        Run(needs=("results/from-nemo",), fresh=("gpt_tp2.nemo",), expect=_file("gpt_tp2.nemo")),
    "mega import gpt.nemo RUN --option tokenizer.library=sentencepiece --option tokenizer.model=/path/spm.model":
        Run(needs=("gpt.nemo", "spm.model"), replace=(("RUN", "results/nemo-spm"), ("/path/spm.model", "spm.model")),
            fresh=("results/nemo-spm",), expect=_has("imported")),
    # docs/bert.md (Converting)
    "mega export results/my-bert ./bert-hf --to hf": Run(needs=("results/my-bert",), fresh=("bert-hf",),
                                                         expect=_file("bert-hf/vocab.txt")),
    "mega import ./bert-hf results/my-bert-back": Run(needs=("bert-hf",), fresh=("results/my-bert-back",),
                                                      expect=_has("imported")),
    "mega export results/my-bert ./bert-megatron --to megatron --option tensor_parallel=2":
        Run(needs=("results/my-bert",), fresh=("bert-megatron",), expect=_file("bert-megatron/iter_0000000/mp_rank_01")),
    "mega import ./bert-megatron results/my-bert-from-megatron":
        Run(needs=("bert-megatron",), fresh=("results/my-bert-from-megatron",), expect=_has("imported")),
    "mega import megatron_bert_345m_v0_1_uncased.zip results/bert-345m --option vocab_file=bert-large-uncased-vocab.txt"
    " --option num_attention_heads=16":
        Run(needs=("megatron_bert_345m_v0_1_uncased.zip", "bert-large-uncased-vocab.txt"), fresh=("results/bert-345m",),
            expect=_has("imported")),
    "mega import megatron_bert_345m_v0_1_cased.zip results/bert-345m-cased --option"
    " vocab_file=bert-large-cased-vocab.txt --option do_lower_case=false --option num_attention_heads=16":
        Run(needs=("megatron_bert_345m_v0_1_cased.zip", "bert-large-cased-vocab.txt"),
            fresh=("results/bert-345m-cased",), expect=_has("imported")),
    # docs/hiddens.md
    "mega run examples/mim.toml": Run(BART, needs=("corpus.txt",), expect=_file("results/megatron_mim/checkpoints")),
    "mega run examples/vae.toml": Run(BART, needs=("corpus.txt",)),
    'mega encode results/megatron_mim --text "A lambda expression" --output z.pt':
        Run(needs=("results/megatron_mim",), fresh=("z.pt",), expect=_has("z_mean")),
    'mega generate results/megatron_mim --prompt "A lambda expression"': Run(FEW_TOKENS, needs=("results/megatron_mim",)),
    # docs/transformer-xl.md
    "mega evaluate RUN_OR_ARCHIVE [--split valid|test|train] [--output FILE] [dotted.key=value ...]": SYNOPSIS,
    "mega evaluate results/quickstart --split test model.micro_batch_size=4":
        Run(needs=("results/quickstart",), expect=_file("results/quickstart/eval_test.json")),
    "mega evaluate results/quickstart --split valid trainer.devices=2 model.tensor_model_parallel_size=2":
        Run(("trainer.accelerator=cpu",), needs=("results/quickstart",), slow=True),
    "mega plan examples/txl-base.toml trainer.devices=8 --vocab-size 267735 --device cuda":
        Run(expect=_has("191.95M parameters")),
    "mega export results/txl-quickstart txl.pt --torchscript": Run(needs=("results/txl-quickstart",), fresh=("txl.pt",),
                                                                   expect=_file("txl.pt")),
    "mega evaluate results/txl-quickstart --split test --torchscript": Run(needs=("results/txl-quickstart",),
                                                                           expect=_has("perplexity")),
    'mega generate results/txl-quickstart --prompt "The for statement" --max-new-tokens 20':
        Run(FEW_TOKENS, needs=("results/txl-quickstart",)),
    "mega run examples/txl-base.toml trainer.devices=8": Run(TXL + WT103, needs=("wt103",),
                                                             expect=_file("results/txl-base/checkpoints")),
    "mega evaluate results/txl-base --split test": Run(needs=("results/txl-base",), expect=_has("perplexity")),
    # docs/ecosystem.md (W&B offline; MLflow's file store, allowed in `workspace`)
    "mega run examples/quickstart.toml exp_manager.name=tracked exp_manager.create_wandb_logger=true"
    " exp_manager.wandb_logger_kwargs.project=mega-quickstart exp_manager.wandb_logger_kwargs.offline=true":
        Run(GPT + DATA, needs=("corpus.txt",), fresh=("results/tracked",), expect=_file("results/tracked/wandb")),
    "mega run examples/quickstart.toml exp_manager.name=tracked-mlflow exp_manager.create_mlflow_logger=true":
        Run(GPT + DATA, needs=("corpus.txt",), fresh=("results/tracked-mlflow",), expect=_file("mlruns")),
    "mega evaluate RUN_OR_ARCHIVE --harness TASKS [--include-path DIR] [--num-fewshot N] [--limit N] [--batch-size N]"
    " [--device DEV] [dotted.key=value ...]": SYNOPSIS,
    "mega evaluate results/quickstart --harness mega_toy_choice --include-path lm_eval_tasks":
        Run(("--limit", "4"), needs=("results/quickstart", "lm_eval_tasks"),
            expect=_file("results/quickstart/eval_harness.json"), slow=True),
    # docs/parallelism.md
    "mega run examples/gpt-tp2.toml": Run(GPT + DATA, needs=("corpus.txt",), slow=True),
    # on a machine with one GPU (or none) the 2 workers must be CPU workers
    "mega run examples/quickstart.toml trainer.devices=2 exp_manager.name=dp2":
        Run(GPT + DATA + ("trainer.accelerator=cpu",), needs=("corpus.txt",), slow=True),
    "torchrun --nnodes=2 --nproc-per-node=8 --rdzv-backend=c10d --rdzv-endpoint=HOST:29500 -m mega run exp.toml"
    " trainer.devices=8 trainer.num_nodes=2": LAUNCH,
    "srun mega run exp.toml trainer.devices=8 trainer.num_nodes=2": LAUNCH,  # the sbatch example (tests/kernel/test_slurm.py)
    # docs/data.md
    "mega preprocess --input FILE --output-prefix PREFIX [--config EXP.toml] [--tokenizer KEY=VALUE|RUN_DIR ...]"
    " [--json-keys KEY ...] [--workers N] [--append-eod]": SYNOPSIS,
    "mega preprocess --input my_corpus.txt --output-prefix data/mine --tokenizer results/quickstart --append-eod --workers 2":
        Run(("--quiet",), needs=("my_corpus.txt", "results/quickstart"), expect=_file("data/mine_text_document.idx")),
    "mega run examples/quickstart.toml exp_manager.name=mine model.data.data_impl=mmap"
    " 'model.data.data_prefix=[data/mine_text_document]' model.tokenizer.model=results/quickstart/tokenizer.model":
        Run(GPT, needs=("data/mine_text_document.idx",), expect=_file("results/mine/checkpoints")),
    # docs/bert.md
    "mega run examples/bert.toml": Run(BERT, expect=_file("results/bert/checkpoints")),
    "mega evaluate results/bert --split valid": Run(needs=("results/bert",), expect=_has('"lm_loss"', '"perplexity"')),
    # docs/downstream.md
    "mega run examples/squad.toml": Run(TASK, needs=("tasks", "results/bert"), fresh=("results/squad",),
                                        expect=_file("results/squad/checkpoints")),
    "mega run examples/squad.toml model.train_ds.file=train.json model.validation_ds.file=dev.json"
    " model.language_model.pretrained_model_name=megatron-bert-345m-uncased": Run(),  # fails as the docs show
    "mega evaluate results/squad --split valid": Run(needs=("results/squad",), expect=_has('"exact_match"', '"f1"')),
    'mega predict results/squad --question "what comes after lambda ?" --context "a lambda expression yields a function'
    ' object"': Run(needs=("results/squad",), expect=_has('"answer"', '"nbest"')),
    "mega run examples/text_classification.toml": Run(TASK, needs=("tasks", "results/bert"),
                                                      fresh=("results/text_classification",)),
    "mega evaluate results/text_classification --split valid": Run(needs=("results/text_classification",),
                                                                   expect=_has('"accuracy"', '"macro_f1"')),
    'mega predict results/text_classification --text "the statement is executed when the loop ends"':
        Run(needs=("results/text_classification",), expect=_has('"label"', '"probabilities"')),
    "mega run examples/token_classification.toml": Run(TASK, needs=("tasks", "results/bert"),
                                                       fresh=("results/token_classification",)),
    "mega evaluate results/token_classification --split valid": Run(needs=("results/token_classification",),
                                                                    expect=_has('"f1"', '"token_accuracy"')),
    'mega predict results/token_classification --text "the result is not none if the key is not in the dict"':
        Run(needs=("results/token_classification",), expect=_has('"entities"')),
    "mega run examples/relation_extraction.toml": Run(TASK, needs=("tasks", "results/bert"),
                                                      fresh=("results/relation_extraction",)),
    "mega evaluate results/relation_extraction --split valid": Run(needs=("results/relation_extraction",),
                                                                   expect=_has('"positive_f1"')),
    "mega predict results/relation_extraction --text 'the <@CHEMICAL$> inhibits the <@GENE$> in the loop'":
        Run(needs=("results/relation_extraction",), expect=_has('"label"', '"probabilities"')),
    "mega run examples/multiple_choice.toml": Run(TASK, needs=("tasks", "results/bert"),
                                                  fresh=("results/multiple_choice",)),
    "mega evaluate results/multiple_choice --split valid": Run(needs=("results/multiple_choice",),
                                                               expect=_has('"accuracy"')),
    "mega export results/token_classification ner.nemo --to nemo": Run(needs=("results/token_classification",),
                                                                       fresh=("ner.nemo",), expect=_file("ner.nemo")),
    'mega predict ner.nemo --text "the result is not none if the key is not in the dict"':
        Run(needs=("ner.nemo",), expect=_has('"entities"')),
    "mega evaluate ner.nemo --split valid model.dataset.data_dir=tasks/ner": Run(needs=("ner.nemo",),
                                                                                 expect=_has('"f1"')),
    "mega export results/squad squad.mega": Run(needs=("results/squad",), fresh=("squad.mega",), expect=_file("squad.mega")),
    'mega predict squad.mega --question "what comes after lambda ?" --context "a lambda expression yields a function'
    ' object"': Run(needs=("squad.mega",), expect=_has('"answer"')),
    "mega evaluate squad.mega --split valid": Run(needs=("squad.mega",), expect=_has('"exact_match"', '"f1"')),
    "mega evaluate squad.mega --split valid trainer.devices=2 model.tensor_model_parallel_size=2 trainer.accelerator=cpu":
        Run(needs=("squad.mega",), slow=True),
    # docs/llama.md (and examples/llama-tiny.toml's comments)
    "mega run examples/llama-tiny.toml": Run(LLAMA + DATA, needs=("corpus.txt",),
                                             expect=_file("results/llama-tiny/checkpoints")),
    'mega generate results/llama-tiny --prompt "The for statement" --top-k 40':
        Run(FEW_TOKENS, needs=("results/llama-tiny",), expect=_has("for statement")),
    "mega export results/llama-tiny ./llama-tiny-hf --to huggingface":
        Run(needs=("results/llama-tiny",), fresh=("llama-tiny-hf",), expect=_file("llama-tiny-hf/config.json")),
    "mega import ./llama-hf results/llama": Run(needs=("llama-hf",), fresh=("results/llama",), expect=_has("imported")),
    "mega import ./llama-hf results/llama --option seq_length=4096 --option add_bos=true":
        Run(needs=("llama-hf",), fresh=("results/llama",), replace=(("seq_length=4096", "seq_length=32"),),
            expect=_has("imported")),  # the tiny model's max_position_embeddings is 64
    "mega export results/llama ./llama-out --to huggingface": Run(needs=("results/llama",), fresh=("llama-out",),
                                                                  expect=_file("llama-out/model.safetensors")),
    "mega export results/llama ./llama-out --to huggingface --option dtype=bfloat16":
        Run(needs=("results/llama",), fresh=("llama-out",), expect=_file("llama-out/model.safetensors")),
    "mega export results/llama ./llama-megatron --to megatron --option tensor_parallel=2 --option pipeline_parallel=2":
        Run(needs=("results/llama",), fresh=("llama-megatron",),
            expect=_file("llama-megatron/iter_0000000/mp_rank_01_001/model_optim_rng.pt")),
    "mega import ./llama-megatron results/llama-from-megatron":
        Run(needs=("llama-megatron",), fresh=("results/llama-from-megatron",), expect=_has("imported")),
    "mega import ./mcore-checkpoints results/llama-from-mcore":
        Run(needs=("mcore-checkpoints",), fresh=("results/llama-from-mcore",), expect=_has("(torch_dist)")),
    # examples/*.toml comments
    "mega run examples/bert.toml trainer.devices=2 model.tensor_model_parallel_size=2 exp_manager.name=bert-tp2":
        Run(BERT + ("trainer.accelerator=cpu",), slow=True),
    "mega run examples/bert.toml model.tokenizer.vocab_file=vocab.txt exp_manager.name=bert-vocab":
        Run(BERT, needs=("vocab.txt",)),
    "mega run examples/quickstart.toml 'model.data.data_prefix=[\"my_corpus.txt\"]' exp_manager.name=my_corpus":
        Run(GPT, needs=("my_corpus.txt",), expect=_file("results/my_corpus/checkpoints/step_0000002")),
    "mega run examples/mim.toml ++model.hiddens.loss.mim.loss_weight=0.5 exp_manager.name=mim_w":
        Run(BART, needs=("corpus.txt",)),
    "mega run examples/vae.toml ++model.hiddens.loss.vae.min_kl_value=0.1 exp_manager.name=vae_kl":
        Run(BART, needs=("corpus.txt",)),
    "mega run examples/txl-quickstart.toml": Run(TXL + DATA, needs=("corpus.txt",),
                                                 expect=_file("results/txl-quickstart/checkpoints")),
    "mega evaluate results/txl-quickstart --split test": Run(needs=("results/txl-quickstart",),
                                                             expect=_file("results/txl-quickstart/eval_test.json")),
    "mega run examples/txl-large.toml trainer.devices=8": Run(TXL + WT103, needs=("wt103",),
                                                              expect=_file("results/txl-large/checkpoints")),
    "mega evaluate results/txl-large --split test": Run(needs=("results/txl-large",), expect=_has("perplexity")),
}


# --- what commands need, built on demand in the workspace ------------------------------------

def _run_doc(ws: Path, command: str) -> None:
    """Run a command of the table (for what another command needs)."""
    spec = COMMANDS[command]
    _prepare(ws, spec)
    assert main(_argv(command, spec)) == 0, command


def _gpt2_small(ws: Path) -> None:
    """A Hugging Face GPT-2 directory: a tiny mega run with a byte-level BPE, exported."""
    from mega.testing import TinyExperiment

    _need(ws, "tok/tokenizer.json")
    exp = TinyExperiment(ws / "hf-src", ws / "corpus.txt")
    run = exp.run(trainer={"max_steps": 1, "val_check_interval": 0},
                  model={"activation": "gelu_tanh", "tokenizer": {"library": "huggingface",
                                                                  "tokenizer_file": str(ws / "tok/tokenizer.json")}})
    assert main(["export", str(run.run_dir), str(ws / "gpt2-small"), "--to", "huggingface"]) == 0


def _bpe(ws: Path) -> None:
    from tokenizers import ByteLevelBPETokenizer

    tok = ByteLevelBPETokenizer()
    tok.train_from_iterator((ws / "corpus.txt").read_text().splitlines(), vocab_size=300, min_frequency=2,
                            special_tokens=["<|endoftext|>"], show_progress=False)
    (ws / "tok").mkdir(exist_ok=True)
    tok.save(str(ws / "tok/tokenizer.json"))


def _nemo(ws: Path) -> None:
    """A NeMo 1.x Megatron GPT archive holding the quickstart run's weights (NeMo's layout,
    written by test_archive's independent helpers)."""
    from mega.checkpoint import restore
    from tests.helpers.nemo_gpt import nemo_shards as _nemo_shards, nemo_yaml as _nemo_yaml, write_nemo as _write_nemo

    model, _, config = restore(ws / "results/quickstart")
    mc = config.model
    cfg = _nemo_yaml(num_layers=mc.num_layers, hidden_size=mc.hidden_size, ffn_hidden_size=mc.ffn_hidden_size,
                     num_attention_heads=mc.num_attention_heads, encoder_seq_length=mc.seq_length,
                     max_position_embeddings=mc.max_position_embeddings)
    _write_nemo(ws / "megatron_gpt.nemo", cfg, _nemo_shards(model, 1), ws / "results/quickstart/tokenizer.model")


def _llama_hf(ws: Path) -> None:
    """A Hugging Face Llama directory: transformers' LlamaForCausalLM from a tiny config (4
    query heads in 2 groups, untied) with a Llama-2-style sentencepiece tokenizer."""
    from tests.helpers import llama as fx

    sp = fx.sentencepiece_llama(ws / "llama-sp")
    import sentencepiece as spm

    model = fx.hf_model("llama_gqa_llama3", spm.SentencePieceProcessor(model_file=str(sp)).get_piece_size())
    fx.save_directory(model, ws / "llama-hf", "sentencepiece", sp)


def _mcore_checkpoints(ws: Path) -> None:
    """A Megatron-LM-style save directory holding a torch_dist iteration (tracker +
    iter_0000002/ with metadata.json, .metadata, the .distcp files and common.pt's args):
    the tiny Llama trained 2 steps with exp_manager.checkpoint.format=torch_dist, whose
    files are megatron-core's layout."""
    assert main(["run", "examples/llama-tiny.toml", *LLAMA, *DATA, "exp_manager.name=llama-dist",
                 "exp_manager.checkpoint.format=torch_dist"]) == 0
    step = ws / "results/llama-dist/checkpoints/step_0000002"
    target = _mkdir(ws / "mcore-checkpoints") / "iter_0000002"
    shutil.copytree(step, target)
    (ws / "mcore-checkpoints/latest_checkpointed_iteration.txt").write_text("2\n")


def _my_bert(ws: Path) -> None:
    """A tiny random mega BERT run with a Google-shaped vocab.txt (what pretraining leaves)."""
    from mega.checkpoint import write_imported_run
    from mega.plugin_manager import get_plugins
    from tests.helpers.bert_files import MEGA_BERT, google_vocab as _google_vocab

    vocab = _google_vocab(ws / "my-bert-vocab.txt", 200)
    raw = {"model": {"name": "bert", **MEGA_BERT, "tokenizer": {"library": "wordpiece", "vocab_file": str(vocab)}}}
    plugins = get_plugins()
    from mega.config import config_from_dict

    mc = config_from_dict(raw, plugins=plugins).model
    model = plugins.models.get("bert").factory(mc, plugins.tokenizers.get("wordpiece").factory(mc.tokenizer, [], None),
                                               plugins)
    write_imported_run(ws / "results/my-bert", raw, model.state_dict(), plugins)


def _ngc(kind: str):
    def make(ws: Path) -> None:
        from tests.helpers.bert_files import ngc_zip as _ngc_zip

        _ngc_zip(ws / f"megatron_bert_345m_v0_1_{kind}.zip", kind, with_args=False)  # as NVIDIA released them
    return make


def _google(kind: str, entries: int):
    def make(ws: Path) -> None:
        from tests.helpers.bert_files import google_vocab as _google_vocab

        _google_vocab(ws / f"bert-large-{kind}-vocab.txt", entries)
    return make


def _lm_eval_tasks(directory: Path) -> None:
    from tests.helpers.lm_eval_tasks import write_tasks as write_lm_eval_tasks

    write_lm_eval_tasks(directory, choice_words=1)  # answers that fit the shortened quickstart's 16 positions


ARTIFACTS: Dict[str, Tuple[Tuple[str, ...], Callable[[Path], None]]] = {
    # name (a path in the workspace): (what it needs, how it is made)
    "corpus.txt": ((), lambda ws: write_corpus(ws / "corpus.txt")),
    "a.txt": ((), lambda ws: write_corpus(ws / "a.txt", seed=1)),
    "b.txt": ((), lambda ws: write_corpus(ws / "b.txt", seed=2)),
    "my_corpus.txt": ((), lambda ws: write_corpus(ws / "my_corpus.txt", seed=3)),
    "exp.toml": ((), lambda ws: (ws / "exp.toml").write_text("[model]\nhiden_size = 64\n")),
    "results/quickstart": (("corpus.txt",), lambda ws: _run_doc(ws, "mega run examples/quickstart.toml")),
    "results/gpt": (("results/quickstart",), lambda ws: shutil.copytree(ws / "results/quickstart", ws / "results/gpt")),
    "model.mega": (("results/gpt",), lambda ws: _run_doc(ws, "mega export results/gpt model.mega")),
    "quickstart-hf": (("results/quickstart",),
                      lambda ws: _run_doc(ws, "mega export results/quickstart ./quickstart-hf --to huggingface")),
    "tok/tokenizer.json": (("corpus.txt",), _bpe),
    "gpt2-small": (("corpus.txt",), _gpt2_small),
    "results/gpt2": (("gpt2-small",), lambda ws: _run_doc(ws, "mega import ./gpt2-small results/gpt2")),
    "megatron_gpt.nemo": (("results/quickstart",), _nemo),
    "gpt.nemo": (("megatron_gpt.nemo",), lambda ws: shutil.copy(ws / "megatron_gpt.nemo", ws / "gpt.nemo")),
    "results/from-nemo": (("megatron_gpt.nemo",), lambda ws: _run_doc(ws, "mega import megatron_gpt.nemo results/from-nemo")),
    "ner.nemo": (("results/token_classification",),
                 lambda ws: _run_doc(ws, "mega export results/token_classification ner.nemo --to nemo")),
    "spm.model": (("results/quickstart",), lambda ws: shutil.copy(ws / "results/quickstart/tokenizer.model",
                                                                 ws / "spm.model")),
    "results/megatron_mim": (("corpus.txt",), lambda ws: _run_doc(ws, "mega run examples/mim.toml")),
    "results/txl-quickstart": (("corpus.txt",), lambda ws: _run_doc(ws, "mega run examples/txl-quickstart.toml")),
    "wt103": ((), lambda ws: [write_corpus(_mkdir(ws / "wt103") / f"{s}.txt", seed=i)
                              for i, s in enumerate(("train", "valid", "test"))]),
    "results/txl-base": (("wt103",), lambda ws: _run_doc(ws, "mega run examples/txl-base.toml trainer.devices=8")),
    "results/txl-large": (("wt103",), lambda ws: _run_doc(ws, "mega run examples/txl-large.toml trainer.devices=8")),
    "data/mine_text_document.idx": (("my_corpus.txt", "results/quickstart"), lambda ws: _run_doc(
        ws, "mega preprocess --input my_corpus.txt --output-prefix data/mine --tokenizer results/quickstart --append-eod --workers 2")),
    "results/bert": ((), lambda ws: _run_doc(ws, "mega run examples/bert.toml")),
    "vocab.txt": (("results/bert",), lambda ws: shutil.copy(ws / "results/bert/vocab.txt", ws / "vocab.txt")),
    "tasks": ((), lambda ws: write_tasks(ws / "tasks", train=40, dev=10)),
    "lm_eval_tasks": ((), lambda ws: _lm_eval_tasks(ws / "lm_eval_tasks")),
    "results/squad": (("tasks", "results/bert"), lambda ws: _run_doc(ws, "mega run examples/squad.toml")),
    "results/text_classification": (("tasks", "results/bert"),
                                    lambda ws: _run_doc(ws, "mega run examples/text_classification.toml")),
    "results/token_classification": (("tasks", "results/bert"),
                                     lambda ws: _run_doc(ws, "mega run examples/token_classification.toml")),
    "results/relation_extraction": (("tasks", "results/bert"),
                                    lambda ws: _run_doc(ws, "mega run examples/relation_extraction.toml")),
    "results/multiple_choice": (("tasks", "results/bert"),
                                lambda ws: _run_doc(ws, "mega run examples/multiple_choice.toml")),
    "squad.mega": (("results/squad",), lambda ws: _run_doc(ws, "mega export results/squad squad.mega")),
    "results/my-bert": ((), _my_bert),
    "results/llama-tiny": (("corpus.txt",), lambda ws: _run_doc(ws, "mega run examples/llama-tiny.toml")),
    "llama-hf": ((), _llama_hf),
    "results/llama": (("llama-hf",), lambda ws: _run_doc(ws, "mega import ./llama-hf results/llama")),
    "llama-megatron": (("results/llama",), lambda ws: _run_doc(
        ws, "mega export results/llama ./llama-megatron --to megatron --option tensor_parallel=2 --option"
            " pipeline_parallel=2")),
    "mcore-checkpoints": (("corpus.txt",), _mcore_checkpoints),
    "bert-hf": (("results/my-bert",), lambda ws: _run_doc(ws, "mega export results/my-bert ./bert-hf --to hf")),
    "bert-megatron": (("results/my-bert",), lambda ws: _run_doc(
        ws, "mega export results/my-bert ./bert-megatron --to megatron --option tensor_parallel=2")),
    "megatron_bert_345m_v0_1_uncased.zip": ((), _ngc("uncased")),
    "megatron_bert_345m_v0_1_cased.zip": ((), _ngc("cased")),
    "bert-large-uncased-vocab.txt": ((), _google("uncased", 30522)),
    "bert-large-cased-vocab.txt": ((), _google("cased", 28996)),
}


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def _need(ws: Path, name: str) -> None:
    if (ws / name).exists():
        return
    deps, make = ARTIFACTS[name]
    for dep in deps:
        _need(ws, dep)
    make(ws)
    assert (ws / name).exists(), f"building {name} did not create it"


def _prepare(ws: Path, spec: Run) -> None:
    for name in spec.needs:
        _need(ws, name)
    for name in spec.fresh:
        target = ws / name
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()


def _argv(command: str, spec: Run) -> List[str]:
    for placeholder, real in spec.replace:
        command = command.replace(placeholder, real)
    return shlex.split(command)[1:] + list(spec.extra)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    ws = tmp_path_factory.mktemp("docs")
    (ws / "examples").symlink_to(ROOT / "examples", target_is_directory=True)
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(ws)
        # docs/ecosystem.md: no tracker or hub is reached; MLflow 3 allows its file store only when asked
        for key, value in {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "MLFLOW_ALLOW_FILE_STORE": "true",
                           "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}.items():
            mp.setenv(key, value)
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        yield ws


# --- the tests ------------------------------------------------------------------------------

DOC_COMMANDS = doc_commands()
_UNIQUE: Dict[str, DocCommand] = {}
for _c in DOC_COMMANDS:
    _UNIQUE.setdefault(_c.text, _c)


def _param(c: DocCommand):
    spec = COMMANDS.get(c.text)
    marks = [pytest.mark.slow] if isinstance(spec, Run) and spec.slow else []
    return pytest.param(c, id=f"{c.where}:{c.text[:60]}", marks=marks)


def test_the_docs_show_commands():
    """The extraction itself works (a broken parser would make every other test vacuous)."""
    texts = {c.text for c in DOC_COMMANDS}
    assert "mega run examples/quickstart.toml" in texts and "mega plugins" in texts
    assert any(c.output for c in DOC_COMMANDS), "the README's `$ mega ...` examples with output were not found"


def test_the_table_has_no_stale_rows():
    stale = set(COMMANDS) - set(_UNIQUE)
    assert not stale, f"COMMANDS rows no document shows any more (remove them): {sorted(stale)}"


@pytest.mark.parametrize("doc", [_param(c) for c in _UNIQUE.values()])
@pytest.mark.slow
def test_doc_command(doc: DocCommand, workspace, capsys):
    spec = COMMANDS.get(doc.text)
    if spec is None:
        pytest.fail(f"{doc.where}: `{doc.text}` is not in tests/docs/test_docs_commands.py's COMMANDS table: add a row saying"
                    " how to shorten it and what it needs")
    words = shlex.split(doc.text)
    if spec == LAUNCH:
        if words[0] == "srun":  # srun [options] mega ARGS
            args = words[words.index("mega") + 1:]
        else:
            args = words[words.index("-m") + 2:]
            assert words[words.index("-m") + 1] == "mega"
        _parser().parse_args(args)
        return
    if spec == SYNOPSIS:
        _check_synopsis(doc, words)
        return
    _prepare(workspace, spec)
    capsys.readouterr()
    status = main(_argv(doc.text, spec))
    out, err = capsys.readouterr()
    if doc.output:  # the docs show what it prints: an error, exit 2
        assert status == 2, f"{doc.where}: expected the error the docs show, got status {status}\n{err}"
        _check_output(doc, err)
        return
    assert status == 0, f"{doc.where}: `{doc.text}` exited {status}:\n{err}"
    if spec.expect:
        spec.expect(out, err, workspace)


def _check_output(doc: DocCommand, err: str) -> None:
    shown = [l for l in err.splitlines() if l.strip()]
    assert len(shown) == len(doc.output), f"{doc.where}: the docs show {doc.output}, it printed {shown}"
    for want, got in zip(doc.output, shown):
        if want.endswith("..."):
            prefix = want[:-3].rstrip()
            assert got.startswith(prefix), f"{doc.where}: docs: {want!r}\nprinted: {got!r}"
        else:
            assert got == want, f"{doc.where}: docs: {want!r}\nprinted: {got!r}"


def _check_synopsis(doc: DocCommand, words: List[str]) -> None:
    parser = _parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    assert words[1] in sub.choices, f"{doc.where}: no command {words[1]!r}"
    flags = {s for a in sub.choices[words[1]]._actions for s in a.option_strings}
    used = {w.strip("[]|") for w in words if w.strip("[]|").startswith("--")}
    assert used <= flags, f"{doc.where}: {sorted(used - flags)} are not options of `mega {words[1]}`"


def test_a_variant_of_a_documented_run_names_its_own_run():
    """Issue 20, item 3: a `mega run examples/X.toml key=value ...` line, where the docs also
    show `mega run examples/X.toml` itself, sets its own exp_manager.name. Without one it
    would land in the first run's directory: a finished run there has nothing to do (the
    line would show nothing), and a changed model or data is refused."""
    bare = {c.text for c in DOC_COMMANDS if re.fullmatch(r"mega run examples/\S+\.toml", c.text)}
    unnamed = []
    for c in DOC_COMMANDS:
        words = shlex.split(c.text)
        if c.output or len(words) < 4 or " ".join(words[:3]) not in bare:
            continue
        if not any(w.startswith("exp_manager.name=") for w in words[3:]):
            unnamed.append(f"{c.where}: {c.text}")
    assert bare and not unnamed, "these lines would resume (or be refused by) the run of the bare command:\n" + "\n".join(unnamed)


def test_the_docs_cite_nothing_outside_the_repository():
    """The docs stand on their own: no citations of files the repository does not have."""
    pattern = re.compile(r"specs/|seeds/|DESIGN\.md")
    hits = []
    for top in ("README.md", "docs", "examples", "plugins", "kernel"):
        path = ROOT / top
        for f in [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file()):
            if f.suffix not in (".md", ".toml", ".py", ".txt"):
                continue
            for n, line in enumerate(f.read_text(errors="replace").splitlines(), 1):
                if pattern.search(line):
                    hits.append(f"{f.relative_to(ROOT)}:{n}: {line.strip()}")
    assert not hits, "\n".join(hits)

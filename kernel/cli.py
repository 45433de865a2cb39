"""The `mega` command line.

    mega run EXPERIMENT.toml [key=value | +key=value | ++key=value ...]
    mega config EXPERIMENT.toml [overrides ...]     print the resolved configuration
    mega plan EXPERIMENT.toml [overrides ...]       parameters, memory per rank, FLOPs, step time
    mega plugins [--json]                           list plugins, hooks and components
    mega generate CHECKPOINT --prompt TEXT          sample from a trained model
    mega encode CHECKPOINT --text T --output F      hiddens (z, z_mean, ...) of an encoder-decoder
    mega evaluate RUN_OR_ARCHIVE [--split test] [overrides ...]   loss and perplexity over a whole split
    mega evaluate RUN_OR_ARCHIVE --harness TASKS    scores on lm-evaluation-harness tasks
    mega preprocess --input F --output-prefix P --tokenizer ...   tokenize into Megatron's .bin/.idx
    mega predict CHECKPOINT --question Q --context C | --text T   ask a fine-tuned task model

Input errors (config, data, checkpoint, plugin) print one message naming the key or file
and exit with status 2.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import List, Optional

import mega
from mega.environment import check_own_package

check_own_package()  # `python -m mega` with PyPI's `mega` over mega-lm's __init__.py: say so, naming both

from mega.errors import ConfigError, MegaError  # noqa: E402
from mega.protocols import EncoderDecoder, Generator  # noqa: E402


class _BarSafeHandler(logging.Handler):
    """Log lines on stderr that do not tear an active tqdm progress bar."""

    def emit(self, record):
        try:
            from tqdm import tqdm

            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # pragma: no cover - logging must never raise
            self.handleError(record)


def _setup_logging(verbose: bool) -> None:
    logger = logging.getLogger("mega")
    if not any(isinstance(h, _BarSafeHandler) for h in logger.handlers):
        handler = _BarSafeHandler()
        handler.setFormatter(logging.Formatter("[mega] %(message)s"))
        logger.addHandler(handler)
    from mega.runtime.slurm import process_rank

    quiet = process_rank() != 0  # launched workers (and srun tasks): only rank 0 narrates
    logger.setLevel(logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO)
    logger.propagate = False


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mega", description="Train Megatron-style language models from one TOML file.")
    p.add_argument("--version", action="version", version=f"mega {mega.__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    r = sub.add_parser("run", help="train an experiment")
    r.add_argument("experiment", help="experiment TOML file")
    r.add_argument("overrides", nargs="*", help="key=value, +key=value (add) or ++key=value (add or replace)")

    c = sub.add_parser("config", help="print the resolved configuration as TOML")
    c.add_argument("experiment", nargs="?", help="experiment TOML file")
    c.add_argument("overrides", nargs="*")
    c.add_argument("--reference", action="store_true", help="print the reference of every key (Markdown)")

    pn = sub.add_parser("plan", help="parameters, memory per rank, FLOPs and step time of an experiment (docs/plan.md)")
    pn.add_argument("experiment", help="experiment TOML file")
    pn.add_argument("overrides", nargs="*")
    pn.add_argument("--devices", type=int, default=None, help="list every TP x PP x DP layout of N devices")
    pn.add_argument("--tflops", type=float, default=None, help="device speed for the step time (default: measured)")
    pn.add_argument("--device", choices=["cpu", "cuda"], default=None, help="estimate for this device (default: the run's)")
    pn.add_argument("--vocab-size", type=int, default=None, help="the tokenizer's size, when its config has none")
    pn.add_argument("--json", action="store_true", help="machine-readable output")

    pl = sub.add_parser("plugins", help="list plugins, their hooks and the components they register")
    pl.add_argument("--json", action="store_true", help="machine-readable output")

    g = sub.add_parser("generate", help="generate text from a checkpoint")
    g.add_argument("checkpoint", help="a checkpoint directory, a checkpoints/ folder, a run directory or an archive"
                                      " (.mega, .nemo)")
    g.add_argument("--prompt", required=True)
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--greedy", action="store_true", help="always take the most likely token")
    g.add_argument("--temperature", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0: all)")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold")
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--device", default="cpu")

    im = sub.add_parser("import", help="turn another tool's checkpoint into a mega run directory")
    im.add_argument("source", help="a Hugging Face model directory, a Megatron-LM checkpoint, an archive, ...")
    im.add_argument("run_dir", help="the run directory to create (mega generate / mega run open it)")
    im.add_argument("--from", dest="fmt", default=None, help="the source's format (default: recognised from its files)")
    im.add_argument("--option", action="append", default=[], metavar="KEY=VALUE", help="format option, e.g. tokenizer files")

    ex = sub.add_parser("export", help="write a mega checkpoint in another tool's format")
    ex.add_argument("checkpoint", help="a checkpoint directory, a checkpoints/ folder or a run directory")
    ex.add_argument("destination")
    ex.add_argument("--to", dest="fmt", default=None,
                    help="the format to write: huggingface (hf), megatron, archive, torchscript; default: archive for a .mega"
                         " destination")
    ex.add_argument("--option", action="append", default=[], metavar="KEY=VALUE", help="format option")
    ex.add_argument("--torchscript", action="store_true",
                    help="write the model's scripted inference module (torch.jit.load opens it without mega)")

    ev = sub.add_parser("evaluate", help="loss and perplexity of a checkpoint over a whole data split")
    ev.add_argument("checkpoint", help="a run directory, a checkpoints/ folder, a checkpoint directory or an archive (.mega)")
    ev.add_argument("overrides", nargs="*", help="key=value: the layout (trainer.devices=2"
                                                 " model.tensor_model_parallel_size=2), the data, the batch size")
    ev.add_argument("--split", choices=["valid", "test", "train"], default="test", help="the split to score (default: test)")
    ev.add_argument("--torchscript", action="store_true",
                    help="score through the model's TorchScript inference module (what mega export --torchscript writes)")
    ev.add_argument("--output", default=None, help="where to write the metrics (default: RUN/eval_<split>.json,"
                                                   " RUN/eval_harness.json with --harness)")
    ev.add_argument("--harness", default=None, metavar="TASKS",
                    help="score lm-evaluation-harness tasks instead (comma-separated; pip install 'mega-lm[lm_eval]')")
    ev.add_argument("--include-path", default=None, metavar="DIR", help="with --harness: a folder of task YAMLs of your own")
    ev.add_argument("--num-fewshot", type=int, default=None, help="with --harness: examples in each prompt")
    ev.add_argument("--limit", type=float, default=None, help="with --harness: documents per task (or a fraction)")
    ev.add_argument("--batch-size", default="1", help="with --harness: requests per forward pass (default: 1)")
    ev.add_argument("--device", default=None, help="with --harness: cpu, cuda, cuda:1 (default: cuda when there is one)")

    e = sub.add_parser("encode", help="encode texts to their hiddens (and z, z_mean) with an encoder-decoder checkpoint")
    e.add_argument("checkpoint")
    e.add_argument("--text", action="append", required=True, help="a text to encode (repeat for a batch)")
    e.add_argument("--output", required=True, help="file to write the tensors to (torch.save of a dict)")

    pp = sub.add_parser("preprocess", help="tokenize JSONL or text into Megatron-LM's indexed files (data_impl = \"mmap\")")
    pp.add_argument("--input", required=True, help="a .jsonl file (one JSON object per line) or a text file (one document"
                                                   " per line)")
    pp.add_argument("--output-prefix", required=True, help="writes PREFIX_KEY_document.bin and .idx for each json key")
    pp.add_argument("--json-keys", nargs="+", default=["text"], help="the JSON keys to tokenize (default: text)")
    pp.add_argument("--config", default=None, help="an experiment TOML: use its model.tokenizer (a tokenizer its run"
                                                   " trained is read from its run directory)")
    pp.add_argument("--tokenizer", action="append", default=[], metavar="KEY=VALUE|RUN",
                    help="a model.tokenizer key (library=bytes, model=spm.model, ...; repeat), or a run directory or"
                         " checkpoint whose tokenizer to use")
    pp.add_argument("--workers", type=int, default=1, help="tokenizing processes")
    pp.add_argument("--append-eod", action="store_true", help="end every document with the end-of-document id")
    pp.add_argument("--data-impl", default="mmap", help="the data source whose files to write (default: mmap)")
    pp.add_argument("--quiet", action="store_true", help="no progress bar")

    pr = sub.add_parser("predict", help="ask a fine-tuned task model: answer a question, label a text")
    pr.add_argument("checkpoint", help="a run directory, checkpoint or archive (.mega) of a fine-tuned task")
    pr.add_argument("--question", help="question answering / multiple choice: the question")
    pr.add_argument("--context", help="question answering: the passage holding the answer (multiple choice: the article)")
    pr.add_argument("--text", help="text / token classification, relation extraction: the text")
    pr.add_argument("--choice", action="append", default=[], dest="choices", help="multiple choice: an option (repeat)")
    return p


def cmd_run(args) -> int:
    from mega.config import load_config
    from mega.plugin_manager import get_plugins
    from mega.runtime.launch import launch_local_workers, launched
    from mega.runtime.slurm import adopt_srun_task

    plugins = get_plugins()
    config = load_config(args.experiment, args.overrides, plugins)  # validate before launching anything
    tr = config.trainer
    adopt_srun_task(tr.devices, tr.num_nodes)  # `srun mega run ...`: this task is one worker, nothing is launched
    workers = tr.devices * tr.num_nodes > 1 and not launched()
    if workers:  # what every worker would check, checked once here, before any is started
        from mega.training.run_dir import check_config_unchanged, check_writable, run_dir_of

        from mega.runtime.parallel import check_devices

        check_devices(tr.accelerator, tr.devices)  # not "invalid device ordinal" from a worker
        _check_layout(config)
        config.model.check(plugins)
        check_config_unchanged(config, run_dir_of(config))
        check_writable(run_dir_of(config))  # a read-only run directory or checkpoints/, before any worker starts
    if not launched():  # refuse a run that cannot fit, before anything is allocated (mega.plan)
        from mega.plan import check_fits

        check_fits(config)
    if workers:
        if tr.num_nodes > 1:
            raise ConfigError(
                f"trainer.num_nodes={tr.num_nodes}: start one launcher per machine, e.g. `torchrun --nnodes={tr.num_nodes}"
                f" --nproc-per-node={tr.devices} --rdzv-backend=c10d --rdzv-endpoint=HOST:PORT -m mega run ...`, or under"
                f" SLURM `srun mega run ...` with {tr.devices} tasks per node (docs/parallelism.md)"
            )
        launch_local_workers(tr.devices, args.argv)  # each worker runs this same command line
        return 0
    mega.run(config, plugins)
    return 0


def _check_layout(config) -> None:
    """The parallel layout and batch geometry of N workers, checked once before launching
    them (each worker would otherwise report the same error)."""
    from mega.runtime.parallel import layout
    from mega.training.batches import batch_geometry

    tr, mc = config.trainer, config.model
    dp = layout(tr.devices * tr.num_nodes, mc.tensor_model_parallel_size, mc.pipeline_model_parallel_size)
    batch_geometry(mc.micro_batch_size, mc.global_batch_size, tr.accumulate_grad_batches, dp)


def cmd_plan(args) -> int:
    from mega.plan import plan_command

    return plan_command(args)


def cmd_config(args) -> int:
    from mega.config import dump_config, load_config

    if args.reference:
        from mega.config.reference import configuration_reference
        from mega.plugin_manager import get_plugins

        sys.stdout.write(configuration_reference(get_plugins()))
        return 0
    if not args.experiment:
        print("mega config: give an experiment file, or --reference", file=sys.stderr)
        return 2
    sys.stdout.write(dump_config(load_config(args.experiment, args.overrides)))
    return 0


def cmd_plugins(args) -> int:
    """Always works, even with plugins that fail to import: those are listed with their error."""
    from mega.plugin_manager import get_plugins, load_plugins, strict_plugins

    # the listing itself names the broken ones; MEGA_STRICT_PLUGINS does not stop it
    plugins = load_plugins(strict=False) if strict_plugins() else get_plugins(warn=False)
    rows = [
        {"name": i.name, "version": i.version, "module": i.module, "hooks": i.hooks, "components": i.components,
         "error": None}
        for i in sorted(plugins.info.values(), key=lambda i: i.name)
    ]
    broken = [{"name": name, "version": None, "module": None, "hooks": [], "components": {}, "error": error}
              for name, error in sorted(plugins.broken.items())]
    if args.json:
        print(json.dumps(rows + broken, indent=2))
        return 0
    for row in rows:
        print(f"{row['name']} {row['version'] or ''}  ({row['module']})")
        print(f"    hooks: {', '.join(row['hooks']) or '-'}")
        for kind, names in sorted(row["components"].items()):
            print(f"    {kind}: {', '.join(names)}")
    for row in broken:
        print(f"{row['name']}  BROKEN")
        print(f"    error: {row['error']}")
    return 0


def cmd_generate(args) -> int:
    from mega.checkpoint import restore
    from mega.inference import check_sampling, generate

    # the flags first: a bad value is reported before the checkpoint is loaded
    check_sampling(args.max_new_tokens, greedy=args.greedy, temperature=args.temperature, top_k=args.top_k,
                   top_p=args.top_p, names={k: f"--{k.replace('_', '-')}" for k in
                                            ("max_new_tokens", "temperature", "top_k", "top_p")})
    model, tokenizer, config = restore(args.checkpoint, device=args.device)
    prompt = tokenizer.encode(args.prompt)
    if isinstance(model, EncoderDecoder):  # encode the prompt, decode from its hiddens
        import torch

        if len(prompt) > config.model.seq_length:  # the encoder's positions, as `mega encode` cuts
            print(f"mega: warning: the prompt has {len(prompt)} tokens; the encoder reads the first"
                  f" {config.model.seq_length} (model.seq_length)", file=sys.stderr)
            prompt = prompt[: config.model.seq_length]
        text_enc = torch.tensor([prompt], device=args.device)
        out = model.greedy_decode(text_enc, torch.ones_like(text_enc), bos_id=tokenizer.pad_id, eos_id=tokenizer.eos_id,
                                  max_len=min(args.max_new_tokens + 1, model.max_positions))
        print(tokenizer.decode(out[0, 1:].tolist()))
        return 0
    if not isinstance(model, Generator):
        raise ConfigError(f"{args.checkpoint}: model {type(model).__name__} cannot generate text (see mega.protocols.Generator)")
    out = generate(model, prompt, args.max_new_tokens, greedy=args.greedy, temperature=args.temperature,
                   top_k=args.top_k, top_p=args.top_p, eos_id=tokenizer.eos_id, seed=args.seed)
    # Decode prompt and continuation together: subword tokenizers mark a word's leading
    # space on its first piece, which a continuation decoded on its own would lose.
    print(tokenizer.decode(prompt + out))
    return 0


def cmd_encode(args) -> int:
    import torch

    from mega.checkpoint import restore

    model, tokenizer, config = restore(args.checkpoint)
    if not isinstance(model, EncoderDecoder):
        raise ConfigError(f"{args.checkpoint}: model {config.model.name!r} has no encoder")
    ids = [tokenizer.encode(t)[: config.model.seq_length] for t in args.text]
    length = max(len(i) for i in ids)
    text_enc = torch.full((len(ids), length), tokenizer.pad_id, dtype=torch.long)
    mask = torch.zeros_like(text_enc)
    for row, i in enumerate(ids):
        text_enc[row, : len(i)] = torch.tensor(i)
        mask[row, : len(i)] = 1
    with torch.no_grad():
        out = model.encode(text_enc, mask)
    tensors = {k: v.detach().cpu() for k, v in out.items() if torch.is_tensor(v)}
    torch.save(tensors, args.output)
    for k, v in tensors.items():
        print(f"{k}: {tuple(v.shape)}")
    return 0


def cmd_evaluate(args) -> int:
    from mega.evaluation import evaluate_command

    return evaluate_command(args)[0]


def _options(pairs: List[str]) -> dict:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"--option {pair!r}: expected KEY=VALUE")
        out[key] = value
    return out


def cmd_import(args) -> int:
    from pathlib import Path

    from mega.checkpoint import find_importer
    from mega.plugin_manager import get_plugins

    plugins = get_plugins()
    source = Path(args.source).expanduser()
    if not source.exists():
        raise ConfigError(f"{source}: no such file or directory")
    fmt = find_importer(source, plugins, args.fmt)
    path = fmt.import_run(source, Path(args.run_dir).expanduser(), _options(args.option), plugins)
    print(f"imported {source} ({fmt.name}) into {path}")
    return 0


def cmd_export(args) -> int:
    from pathlib import Path

    from mega.checkpoint import find_exporter, resolve_checkpoint
    from mega.plugin_manager import get_plugins

    plugins = get_plugins()
    if args.torchscript and args.fmt not in (None, "torchscript"):
        raise ConfigError(f"--torchscript and --to {args.fmt}: give one of them")
    name = "torchscript" if args.torchscript else args.fmt or ("archive" if args.destination.endswith(".mega") else None)
    if name is None:
        raise ConfigError(f"{args.destination}: say which format to write with --to (huggingface, megatron, archive, ...)")
    fmt = find_exporter(name, plugins)
    checkpoint = resolve_checkpoint(args.checkpoint)
    path = fmt.export_run(checkpoint, Path(args.destination).expanduser(), _options(args.option), plugins)
    print(f"exported {checkpoint} as {name} to {path}")
    return 0


def cmd_preprocess(args) -> int:
    from mega.preprocess import preprocess_command

    return preprocess_command(args)


def cmd_predict(args) -> int:
    from mega.checkpoint import restore
    from mega.protocols import Predicts

    model, tokenizer, config = restore(args.checkpoint)
    if not isinstance(model, Predicts):
        raise ConfigError(f"{args.checkpoint}: model.name={config.model.name!r} does not answer `mega predict`"
                          " (fine-tuned tasks do: question_answering, text_classification, ...)")
    inputs = {k: getattr(args, k) for k in ("question", "context", "text", "choices") if getattr(args, k)}
    print(json.dumps(model.predict(inputs, tokenizer), indent=2, ensure_ascii=False))
    return 0


COMMANDS = {"run": cmd_run, "config": cmd_config, "plugins": cmd_plugins, "generate": cmd_generate, "encode": cmd_encode,
            "import": cmd_import, "export": cmd_export, "plan": cmd_plan, "evaluate": cmd_evaluate,
            "preprocess": cmd_preprocess, "predict": cmd_predict}


def _warn_foreign_mega() -> None:
    from mega.environment import foreign_mega_distribution

    version = foreign_mega_distribution()
    if version is not None:
        logging.getLogger("mega").warning(
            "PyPI's unrelated `mega` %s is installed in this environment too: it shares the top-level `mega` package"
            " with mega-lm, so uninstalling either deletes the other's mega/__init__.py; keep them in separate"
            " environments (README: the name `mega`)", version)


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args, extra = _parser().parse_known_args(argv)
    if extra:  # overrides after an option (`mega evaluate RUN --split valid key=value`)
        if args.command == "evaluate" and all("=" in e and not e.startswith("-") for e in extra):
            args.overrides += extra
        else:
            _parser().parse_args(argv)  # argparse's own error for what it does not know
    args.argv = argv
    _setup_logging(args.verbose)
    _warn_foreign_mega()
    try:
        return _dispatch(args)
    except BaseException as exc:
        if not (isinstance(exc, SystemExit) and exc.code in (0, None)):
            from mega.runtime.launch import record_worker_error

            record_worker_error(exc)  # so a launching process can name this worker's error
        raise


def _dispatch(args) -> int:
    try:
        return COMMANDS[args.command](args)
    except MegaError as exc:
        from mega.runtime.launch import record_worker_error

        record_worker_error(exc)
        print(f"mega: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except SystemExit as exc:
        if exc.code in (130, 138, 143):  # stopped by SIGINT / SIGUSR1 / SIGTERM after saving a checkpoint
            print(f"mega: {exc}", file=sys.stderr)
        raise
    except KeyboardInterrupt:
        print("mega: interrupted", file=sys.stderr)
        return 130
    except ValueError as exc:
        if args.command == "generate":  # a bad prompt or sampling setting
            print(f"mega: error: {exc}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

"""The `nemo` checkpoint format: `mega import model.nemo RUN_DIR` reads a NeMo 1.x Megatron
GPT archive into a mega run directory (import only).

A `.nemo` file is a tar (gzipped before NeMo 1.7) holding `model_config.yaml` and the
weights: `model_weights.ckpt` for one rank, `mp_rank_XX/model_weights.ckpt` per
tensor-parallel rank, `tp_rank_XX_pp_rank_YYY/model_weights.ckpt` with pipeline
parallelism; each a flat state dict whose names start with `model.` (`model.module.` with
`megatron_amp_O2`). Tokenizer files sit at the archive's root, named in the yaml as
`nemo:<uuid>_<name>`.

Both of NeMo's GPT namings are read: the legacy one (`language_model.embedding...`,
`language_model.encoder.layers.N...`, which is mega's; older spellings `transformer`,
`attention.` and the `*_norm` names of late legacy Megatron included) and megatron-core's
(`embedding...`, `decoder.layers.N.self_attention.linear_qkv...`, `mcore_gpt: true`), whose
fused QKV rows have the same per-head order. Tensor-parallel shards are merged along the
split dimension of mega's own parameters (the kernel's `merge_shards`), pipeline stages
renumbered to global layer indices, and the vocabulary padding re-cut for one process.

What mega's GPT cannot run (rotary positions, SwiGLU, RMSNorm, bias-less layers, untied
output layer, grouped-query attention, post-LN blocks) is refused naming the yaml key.
"""
from __future__ import annotations

import io
import tarfile
import tempfile
from pathlib import Path
from typing import Dict, List, Mapping

import torch

import mega
from mega.errors import CheckpointError, ConfigError
from mega.checkpoint.load_errors import describe
from mega.plugins.checkpoints import mcore_names
from mega.plugins.checkpoints.archive import safe_members
from mega.plugins.checkpoints.megatron import current_name

SUFFIX = ".nemo"
CONFIG = "model_config.yaml"
WEIGHTS = "model_weights.ckpt"
# NeMo's `activation` names mega's GPT can run. NeMo (legacy ParallelMLP and megatron-core
# alike) computes `gelu` with its fused bias-GELU kernel while `bias_activation_fusion` is
# true (the default), which is the tanh approximation; exact (erf) GELU only with the fusion
# off; `openai_gelu: true` forces the tanh form. `fast-gelu` / `openai-gelu` are not NeMo's
# own names but say tanh GELU unambiguously. `approx-gelu` is x * sigmoid(1.702 x) (quick
# GELU), which mega's GPT does not have: refused.
ACTIVATIONS = ("gelu", "fast-gelu", "openai-gelu")
NORMS = ("layernorm", "low_precision_layernorm")
# yaml keys copied to mega's model table unchanged
COPIED = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "max_position_embeddings",
          "layernorm_epsilon", "make_vocab_size_divisible_by", "hidden_dropout", "attention_dropout", "init_method_std",
          "micro_batch_size", "global_batch_size")
# the last pipeline stage's copy of the tied word embedding (legacy NeMo, Megatron-LM, mcore)
TIED_COPIES = ("word_embeddings.weight", "word_embeddings_for_head.weight", "output_layer.weight")


class NemoFormat:
    name = "nemo"

    def save(self, state: dict, directory: Path, parallel=None) -> None:
        raise CheckpointError("the nemo format only imports (`mega import model.nemo RUN_DIR`); train with 'native'")

    def load(self, directory: Path, parallel=None, parts=()) -> dict:
        raise CheckpointError(f"{directory}: the nemo format only imports; `mega import model.nemo RUN_DIR` first")

    def can_import(self, source: Path) -> bool:
        return Path(source).suffix == SUFFIX and Path(source).is_file()

    def import_run(self, source: Path, run_dir: Path, options: Mapping[str, str], plugins) -> Path:
        """`options`: `tokenizer.KEY=VALUE` replaces the mapped tokenizer table's keys (e.g.
        `tokenizer.library=sentencepiece tokenizer.model=/path/spm.model` for a tokenizer
        mega cannot map)."""
        source = Path(source)
        with _open(source) as tar, tempfile.TemporaryDirectory(prefix="mega-nemo-") as tmp:
            members = _members(source, tar)
            cfg = _yaml(source, tar, members)
            model_table = model_config(cfg, source)
            tok, files = _tokenizer(source, tar, members, cfg, Path(tmp), options)
            model_table["tokenizer"] = tok
            state = _weights(source, tar, members, cfg, model_table, files, plugins)
            from mega.checkpoint import write_imported_run

            return write_imported_run(run_dir, {"model": model_table}, state, plugins, files=files)


def _open(source: Path) -> tarfile.TarFile:
    try:
        return tarfile.open(source, "r:*")  # uncompressed since NeMo 1.7, gzipped before
    except (tarfile.TarError, OSError) as exc:
        raise CheckpointError(f"{source}: not a .nemo archive (a tar file): {exc}") from None


def _members(source: Path, tar: tarfile.TarFile) -> Dict[str, tarfile.TarInfo]:
    """File members by name, with the archive format's checks (no links, no names outside)."""
    return safe_members(tar, source)


def _read(source: Path, tar: tarfile.TarFile, member: tarfile.TarInfo, name: str) -> bytes:
    try:
        return tar.extractfile(member).read()
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise CheckpointError(f"{source}: member {name} cannot be read ({exc})") from None


def _yaml(source: Path, tar, members) -> dict:
    import yaml

    if CONFIG not in members:
        raise CheckpointError(f"{source}: has no {CONFIG}; not a NeMo model archive")
    try:
        cfg = yaml.safe_load(_read(source, tar, members[CONFIG], CONFIG))
    except yaml.YAMLError as exc:
        raise CheckpointError(f"{source}: {CONFIG} is not valid YAML ({exc})") from None
    if isinstance(cfg, dict) and "num_layers" not in cfg and isinstance(cfg.get("model"), dict):
        cfg = cfg["model"]  # a whole training config rather than the model's
    if not isinstance(cfg, dict) or "num_layers" not in cfg:
        raise CheckpointError(f"{source}: {CONFIG} has no num_layers; only Megatron GPT models are imported")
    return cfg


def model_config(cfg: dict, source: Path = Path("model.nemo")) -> dict:
    """mega's `model` table for a NeMo Megatron GPT `model_config.yaml` (tokenizer aside);
    what mega's GPT cannot run is refused naming the yaml key."""

    def refuse(key: str, why: str):
        raise CheckpointError(f"{source}: {CONFIG}: {key}={cfg.get(key)!r}: {why}")

    target = str(cfg.get("target", ""))
    if target and "GPT" not in target:
        refuse("target", "only Megatron GPT models are imported")
    if cfg.get("position_embedding_type", "learned_absolute") != "learned_absolute":
        refuse("position_embedding_type", "mega's gpt has learned absolute positions only (no rotary/alibi)")
    if cfg.get("activation", "gelu") == "approx-gelu":
        refuse("activation", "NeMo's approx-gelu is x * sigmoid(1.702 x) (quick GELU); mega's gpt runs exact or tanh GELU")
    if cfg.get("activation", "gelu") not in ACTIVATIONS:
        refuse("activation", f"mega's gpt runs {', '.join(ACTIVATIONS)} (no gated MLPs such as swiglu)")
    if cfg.get("normalization", "layernorm") not in NORMS:
        refuse("normalization", "mega's gpt uses LayerNorm (no RMSNorm or layernorm1p)")
    if cfg.get("bias", True) is not True:
        refuse("bias", "mega's gpt has biases in every linear layer")
    if cfg.get("share_embeddings_and_output_weights", True) is not True:
        refuse("share_embeddings_and_output_weights", "mega's gpt ties its output layer to the word embedding")
    if cfg.get("transformer_block_type", "pre_ln") != "pre_ln":
        refuse("transformer_block_type", "mega's gpt is pre-LayerNorm")
    heads = cfg.get("num_attention_heads")
    if cfg.get("num_query_groups") not in (None, heads):
        refuse("num_query_groups", "mega's gpt has no grouped-query attention")
    if cfg.get("kv_channels") not in (None, (cfg.get("hidden_size") or 0) // max(heads or 1, 1)):
        refuse("kv_channels", "mega's gpt uses hidden_size / num_attention_heads per head")
    if cfg.get("virtual_pipeline_model_parallel_size") not in (None, 1):
        refuse("virtual_pipeline_model_parallel_size", "interleaved pipeline archives are not read")
    for key in ("num_layers", "hidden_size", "num_attention_heads", "encoder_seq_length"):
        if not isinstance(cfg.get(key), int):
            refuse(key, "needed, as an integer")
    table = {"name": "gpt", "seq_length": cfg["encoder_seq_length"], "activation": activation_of(cfg)}
    table.update({k: cfg[k] for k in COPIED if cfg.get(k) is not None})
    return table


def activation_of(cfg: dict) -> str:
    """mega's activation for a NeMo GPT yaml: `openai_gelu: true`, a tanh name, or `gelu`
    with `bias_activation_fusion` (default true: NeMo's fused bias-GELU is the tanh
    approximation) -> "gelu_tanh"; `gelu` with the fusion off -> exact "gelu"."""
    activation = cfg.get("activation", "gelu")
    if cfg.get("openai_gelu", False) or activation in ("fast-gelu", "openai-gelu"):
        return "gelu_tanh"
    return "gelu_tanh" if cfg.get("bias_activation_fusion", True) else "gelu"


def _nemo_path(value) -> str:
    return str(value)[len("nemo:"):] if str(value).startswith("nemo:") else str(value)


TOKENIZER_OPTIONS = ("tokenizer.library", "tokenizer.model", "tokenizer.tokenizer_file", "tokenizer.vocab_file",
                     "tokenizer.merges_file")


def _member(source: Path, tar, members, tmp: Path, key: str, value) -> Path:
    """The archive member a yaml `nemo:<uuid>_<name>` value names, extracted into `tmp`."""
    name = _nemo_path(value or "")
    member = members.get(name) or next((m for n, m in members.items() if name and n.endswith(Path(name).name)), None)
    if member is None:
        raise CheckpointError(f"{source}: {CONFIG}: tokenizer.{key}={value!r} is not in the archive")
    target = tmp / Path(member.name).name
    target.write_bytes(_read(source, tar, member, member.name))
    return target


def _tokenizer(source: Path, tar, members, cfg: dict, tmp: Path, options: Mapping[str, str]):
    """mega's tokenizer table and files: a sentencepiece model or a GPT-2 BPE vocab.json +
    merges.txt (NeMo's `GPT2BPETokenizer`, library `megatron` or `huggingface`) taken from
    the archive; anything else named with `--option tokenizer.KEY=VALUE`."""
    from mega.checkpoint import check_options

    check_options(options, TOKENIZER_OPTIONS, "nemo")
    tok_cfg = cfg.get("tokenizer") or {}
    overrides = {key[len("tokenizer."):]: value for key, value in options.items()}
    files: Dict[str, Path] = {}
    library = overrides.get("library", tok_cfg.get("library"))
    gpt2_bpe = tok_cfg.get("vocab_file") and tok_cfg.get("merge_file") and (
        tok_cfg.get("type") == "GPT2BPETokenizer" or library in ("megatron", "huggingface"))
    if "library" not in overrides and gpt2_bpe:
        library = "huggingface"
        if not {"vocab_file", "merges_file", "tokenizer_file"} & set(overrides):
            files["vocab_file"] = _member(source, tar, members, tmp, "vocab_file", tok_cfg["vocab_file"])
            files["merges_file"] = _member(source, tar, members, tmp, "merge_file", tok_cfg["merge_file"])
    elif library == "sentencepiece" and "model" not in overrides:
        files["model"] = _member(source, tar, members, tmp, "model", tok_cfg.get("model"))
    elif library is None or (library != "sentencepiece" and "library" not in overrides):
        raise CheckpointError(f"{source}: {CONFIG}: tokenizer.library={library!r}: mega maps sentencepiece and GPT-2 BPE"
                              " (vocab_file + merge_file) tokenizers; name one with --option tokenizer.library=NAME"
                              " (and tokenizer.KEY=PATH for its files)")
    tok = {"library": library}
    for key, value in overrides.items():
        if key != "library":
            files[key] = Path(value).expanduser()
            if not files[key].is_file():
                raise ConfigError(f"--option tokenizer.{key}={value}: no such file")
    return tok, files


def _rank_members(source: Path, members, cfg: dict) -> List[List[str]]:
    """Weight member names, [stage][tp rank]."""
    if WEIGHTS in members:
        return [[WEIGHTS]]
    if any(n.endswith("/.metadata") or n.startswith("model_weights/") for n in members):
        raise CheckpointError(f"{source}: holds a distributed (torch_dist) model_weights/ directory; mega reads"
                              f" .nemo files with {WEIGHTS} (save the model with dist-ckpt disabled)")
    tp, pp = int(cfg.get("tensor_model_parallel_size", 1)), int(cfg.get("pipeline_model_parallel_size", 1))
    if pp == 1:
        names = [[f"mp_rank_{t:02d}/{WEIGHTS}" for t in range(tp)]]
    else:
        names = [[f"tp_rank_{t:02d}_pp_rank_{p:03d}/{WEIGHTS}" for t in range(tp)] for p in range(pp)]
    for stage in names:
        for n in stage:
            if n not in members:
                raise CheckpointError(f"{source}: member {n} is missing (tensor_model_parallel_size={tp},"
                                      f" pipeline_model_parallel_size={pp} in {CONFIG})")
    return names


def mega_name(name: str) -> str:
    """A NeMo GPT state-dict name (legacy or megatron-core, without the `model.` prefix)
    under mega's (Megatron-LM legacy) naming; unknown names are returned unchanged."""
    mapped = mcore_names.mega_name(name)  # mcore_gpt's names, from the one table both ways
    return mapped if mapped != name else current_name(name)  # legacy NeMo names are Megatron-LM's


def _weights(source: Path, tar, members, cfg: dict, model_table: dict, files, plugins) -> Dict[str, torch.Tensor]:
    from mega.config import config_from_dict
    from mega.runtime.parallel import ParallelState
    from mega.runtime.sharding import fit, merge_shards, renumber, sharding_of

    # mega's model at one process: its names, shapes and tensor-parallel split dimensions
    raw = {"model": {**model_table, "tokenizer": {**model_table["tokenizer"], **{k: str(v) for k, v in files.items()}}}}
    mc = config_from_dict(raw, plugins=plugins, source=f"{source} ({CONFIG})").model
    mc.check(plugins)
    tokenizer = plugins.tokenizers.get(mc.tokenizer.library, "tokenizer.library").factory(mc.tokenizer, [], None)
    with torch.random.fork_rng(devices=[]):
        model = plugins.models.get("gpt", "model.name").factory(mc, tokenizer, plugins)
    sharding = sharding_of(model, ParallelState())
    expected = model.state_dict()
    names = _rank_members(source, members, cfg)
    per_stage = cfg["num_layers"] // len(names)
    full: Dict[str, torch.Tensor] = {}
    origin: Dict[str, str] = {}
    for stage, stage_names in enumerate(names):
        ranks = []
        for name in stage_names:
            try:
                raw_state = torch.load(io.BytesIO(_read(source, tar, members[name], name)), map_location="cpu", weights_only=True)
            except CheckpointError:
                raise
            except Exception as exc:
                raise CheckpointError(f"{source}: member {name} cannot be read as plain tensors: {describe(exc)}") from None
            state = {}
            for key, tensor in raw_state.items():
                short = key.removeprefix("model.module.").removeprefix("model.")
                if short.endswith("._extra_state") or short in TIED_COPIES:
                    continue
                mapped = renumber(mega_name(short), stage * per_stage)
                state[mapped] = tensor
                origin.setdefault(mapped, f"{name}: {key}")
            ranks.append(state)
        unexpected = sorted(set(ranks[0]) - set(expected))
        if unexpected:
            raise CheckpointError(f"{source}: weights mega's gpt has no place for: {', '.join(origin[u] for u in unexpected[:5])}")
        present = {k: d for k, d in sharding["partition_dims"].items() if k in ranks[0]}
        full.update(merge_shards(ranks, {"partition_dims": present}))
    missing = sorted(set(expected) - set(full))
    if missing:
        raise CheckpointError(f"{source}: weights missing from the archive (mega names): {', '.join(missing[:5])}")
    word = "language_model.embedding.word_embeddings.weight"
    rows = full[word].shape[0]
    if rows < tokenizer.vocab_size:
        raise CheckpointError(f"{source}: the word embedding has {rows} rows, fewer than the tokenizer's"
                              f" {tokenizer.vocab_size} tokens (a different tokenizer?)")
    for name, tensor in full.items():
        want = list(expected[name].shape)
        have = list(tensor.shape)
        if name == word:  # the vocabulary padding depends on the tensor-parallel size: re-cut it
            have, want = have[1:], want[1:]
        if have != want:
            raise CheckpointError(f"{source}: {origin[name]} has shape {list(tensor.shape)}, mega's gpt expects"
                                  f" {list(expected[name].shape)} from {CONFIG}")
    full[word] = fit(full[word], list(expected[word].shape)).clone()
    return full


@mega.hookimpl
def register_checkpoint_formats(register):
    register("nemo", NemoFormat)

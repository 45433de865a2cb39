"""The activation-memory keys of the transformer models, NeMo's names (Megatron-LM's flags in
brackets), and their checks: activation recomputation (`activations_checkpoint_*`,
`recompute_modules`) and sequence parallelism (`sequence_parallel`).

The rules are Megatron-core's (`TransformerConfig.__post_init__`, `arguments.py`), each a
ConfigError naming the keys, raised by the model config's `check()` before any process
starts:

* `full` needs a method (`uniform` or `block`) and `activations_checkpoint_num_layers` in
  [1, layers per pipeline stage];
* `selective` takes neither a method nor a number of layers, and recomputes the modules of
  `recompute_modules`: `core_attn` (attention scores, softmax, dropout, the weighted sum)
  and `mlp` (fc1, GeLU, fc2); Megatron's other modules are for MoE / MLA / Transformer
  Engine layers mega does not have, and its output-discarding `layernorm` is not built;
* without a granularity the method and number of layers are ignored, as in Megatron and
  NeMo (whose shipped configs carry `activations_checkpoint_method: block` with it unset);
* `distribute_saved_activations` (NeMo passes false, "not currently used") is accepted only
  false;
* `sequence_parallel` needs tensor parallelism and a sequence length that divides by it.
  Megatron-LM and NeMo turn it off with a warning at TP = 1; mega refuses the combination,
  so a config never says something the run does not do.
"""
from __future__ import annotations

from typing import List, Literal, Optional

from attrs import define

from mega.config import key
from mega.errors import ConfigError

RECOMPUTE_MODULES = ("core_attn", "mlp")  # what mega's blocks can recompute selectively
# Megatron's other `recompute_modules`, named in the error: they belong to layers mega does not have
MEGATRON_ONLY_MODULES = ("layernorm", "moe", "moe_act", "shared_experts", "mla_up_proj", "gdn_norm_out", "gdp_in_proj",
                         "gdp_qkv", "mhc")


# The key sets are mixins of the model configs (slots=False: one slotted base per class).
@define(kw_only=True, slots=False)
class RecomputeKeys:
    """Activation recomputation (docs/parallelism.md, "Activation memory")."""

    activations_checkpoint_granularity: Optional[Literal["selective", "full"]] = key(None,
            help="recompute in backward: \"selective\" (recompute_modules of each layer) or \"full\" (whole layers); unset: none (Megatron's --recompute-granularity)")
    activations_checkpoint_method: Optional[Literal["uniform", "block"]] = key(None,
            help='with "full": "uniform" (chunks of activations_checkpoint_num_layers layers, each keeping only its input) or "block" (the first activations_checkpoint_num_layers layers of each pipeline stage) (--recompute-method)')
    activations_checkpoint_num_layers: Optional[int] = key(None,
            help='with "full": layers per chunk (uniform) or layers recomputed per stage (block), 1 to layers per stage (--recompute-num-layers)')
    recompute_modules: List[str] = key(factory=lambda: ["core_attn"],
            help='with "selective": "core_attn" (scores, softmax, attention dropout) and/or "mlp" (--recompute-modules)')
    distribute_saved_activations: bool = key(False,
            help="Megatron's split of a recomputed chunk's input over TP ranks: not supported (NeMo passes false)")


@define(kw_only=True, slots=False)
class SequenceParallelKey:
    """Sequence parallelism (docs/parallelism.md)."""

    sequence_parallel: bool = key(False,
            help="with tensor parallelism: LayerNorms, dropouts and the residual stream split along the sequence over the TP ranks (--sequence-parallel)")


def check_recompute(section, where: str, layers_per_stage: int, full_only: bool = False) -> None:
    """The recomputation keys of `section` (a config with RecomputeKeys' fields, at dotted
    path `where`), for a stack of `layers_per_stage` layers on each pipeline stage.
    `full_only`: a model whose layers have no selective path (Transformer-XL)."""
    granularity = section.activations_checkpoint_granularity
    method = section.activations_checkpoint_method
    k = section.activations_checkpoint_num_layers
    if section.distribute_saved_activations:
        raise ConfigError(f"{where}.distribute_saved_activations = true is not supported (NeMo passes false); leave it out")
    if granularity is None:
        return
    if granularity == "full":
        if method is None:
            raise ConfigError(f"{where}.activations_checkpoint_granularity = \"full\" needs"
                              f" {where}.activations_checkpoint_method = \"uniform\" or \"block\"")
        if k is None or not 1 <= k <= layers_per_stage:
            raise ConfigError(f"{where}.activations_checkpoint_num_layers={k}: with \"full\" recomputation it must be"
                              f" between 1 and the layers per pipeline stage ({layers_per_stage})")
        return
    if full_only:
        raise ConfigError(f"{where}.activations_checkpoint_granularity = \"selective\": this model recomputes whole"
                          " layers only; use \"full\"")
    if method is not None:
        raise ConfigError(f"{where}.activations_checkpoint_method = {method!r} is for \"full\" recomputation;"
                          f" leave it out with {where}.activations_checkpoint_granularity = \"selective\"")
    if k is not None:
        raise ConfigError(f"{where}.activations_checkpoint_num_layers = {k} is for \"full\" recomputation;"
                          f" leave it out with {where}.activations_checkpoint_granularity = \"selective\"")
    modules = list(section.recompute_modules)
    if not modules:
        raise ConfigError(f"{where}.recompute_modules is empty: \"selective\" recomputation needs at least one of"
                          f" {', '.join(map(repr, RECOMPUTE_MODULES))}")
    for m in modules:
        if m not in RECOMPUTE_MODULES:
            why = "a Megatron module of layers mega does not build" if m in MEGATRON_ONLY_MODULES else "unknown"
            raise ConfigError(f"{where}.recompute_modules: {m!r} is {why}; mega recomputes"
                              f" {' and '.join(map(repr, RECOMPUTE_MODULES))}")


def check_sequence_parallel(cfg, lengths: dict, supported: Optional[str] = None) -> None:
    """`model.sequence_parallel` of `cfg` against its TP size and the sequence lengths the
    stack splits (`lengths`: dotted key -> value). `supported`: None, or why this model
    cannot split its sequence (the error says so)."""
    if not cfg.sequence_parallel:
        return
    if supported is not None:
        raise ConfigError(f"model.sequence_parallel = true: {supported}")
    tp = cfg.tensor_model_parallel_size
    if tp == 1:
        raise ConfigError("model.sequence_parallel = true needs tensor parallelism (model.tensor_model_parallel_size > 1):"
                          " it splits what TP leaves replicated")
    for name, s in lengths.items():
        if s % tp:
            raise ConfigError(f"{name}={s} is not divisible by model.tensor_model_parallel_size={tp}"
                              " (model.sequence_parallel splits the sequence over the TP ranks)")


def eager_reason(section, where: str = "model") -> Optional[str]:
    """The keys of `section` that keep its training step out of torch.compile (the model's
    `eager_reason`, read by `mega run`): recomputation's checkpoint context and the
    sequence-parallel linear's saved-tensor hooks are not tested under torch.compile."""
    keys = []
    if section.activations_checkpoint_granularity is not None:
        keys.append(f"{where}.activations_checkpoint_granularity")
    if getattr(section, "sequence_parallel", False):
        keys.append(f"{where}.sequence_parallel")
    return " and ".join(keys) or None

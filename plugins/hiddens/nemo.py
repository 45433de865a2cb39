"""The hiddens module in NeMo 1.x `.nemo` archives of MIM / VAE encoder-decoders (NeMo
v1.23.0: `nemo/collections/nlp/modules/common/megatron/hiddens/`), both ways.

* **yaml.** NeMo's `model.hiddens` section (`enc_output_name`, `tokens_loss_weight`,
  `transform` and `loss`, each a table of named components or a list of such tables, with
  `cls_name` and the constructor's keyword arguments) is mega's `model.hiddens` table key for
  key; mega's own `nemo_compat` is not NeMo's and stays out of an exported yaml, and
  components NeMo does not have (`guided_cls`, `guided_cls_loss`: NeMo only names them) are
  refused on export.
* **weights.** The module's state dict is the same on both sides
  (`hiddens_module.hidden_transforms.<i>.<param>`); NeMo's `cond_gaussian` projection is a
  ColumnParallelLinear gathered after it (its rows split across tensor-parallel ranks, the
  mean's and log-variance's halves taken from the gathered output), mega's a Linear whole on
  every rank: `split_dims` says so to the archive format.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

from mega.errors import ConfigError

# NeMo's components and the parameters it splits by rows across tensor-parallel ranks
NEMO_COMPONENTS = {"cond_gaussian": ("hiddens_to_mean_logvar.weight", "hiddens_to_mean_logvar.bias"),
                   "a_mim": (), "vae": ()}
MEGA_ONLY_KEYS = ("nemo_compat",)


def entries(section) -> List[Tuple[str, dict]]:
    """(name, component table) in order, from a table or a list of tables (NeMo's two forms)."""
    tables = section if isinstance(section, list) else [section or {}]
    return [(name, cfg) for table in tables for name, cfg in table.items()]


def hiddens_table(nemo_hiddens: Optional[dict]) -> Optional[dict]:
    """mega's `model.hiddens` for NeMo's section (None for none)."""
    if not nemo_hiddens:
        return None
    return {k: v for k, v in nemo_hiddens.items() if k not in MEGA_ONLY_KEYS}


def hiddens_yaml(hiddens: dict) -> dict:
    """NeMo's section for mega's `model.hiddens` (as a plain table); what NeMo lacks is a
    ConfigError naming mega's key."""
    for kind in ("transform", "loss"):
        for name, cfg in entries(hiddens.get(kind)):
            if cfg.get("cls_name") not in NEMO_COMPONENTS:
                raise ConfigError(f"model.hiddens.{kind}.{name}.cls_name={cfg.get('cls_name')!r}: NeMo has no such"
                                  f" hidden {kind} (it has {', '.join(NEMO_COMPONENTS)})")
    return {k: v for k, v in hiddens.items() if k not in MEGA_ONLY_KEYS}


def split_dims(hiddens: dict, prefix: str = "hiddens_module.") -> Dict[str, Optional[int]]:
    """{mega name: 0} for each tensor NeMo splits by rows across tensor-parallel ranks."""
    out: Dict[str, Optional[int]] = {}
    for i, (_, cfg) in enumerate(entries(hiddens.get("transform"))):
        for param in NEMO_COMPONENTS.get(cfg.get("cls_name"), ()):
            out[f"{prefix}hidden_transforms.{i}.{param}"] = 0
    return out

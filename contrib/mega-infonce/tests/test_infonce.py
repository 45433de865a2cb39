"""The third-party hiddens path: the installed package's transform and loss are listed,
equal their formulas, and an experiment trains with them by name through `mega run`."""
from __future__ import annotations

import json
import math

import torch

from mega.testing import run_cli
from mega.plugins.hiddens import get_hiddens_module, get_registered_hiddens


def test_registered_through_the_entry_point(capsys):
    names = get_registered_hiddens()
    assert "seq_pool" in names["transform"] and "info_nce" in names["loss"]
    assert run_cli(["plugins", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["infonce"]["components"] == {"hidden_transforms": ["seq_pool"], "hidden_losses": ["info_nce"]}


def test_info_nce_equals_the_formula(mega_device):
    """On the CPU, and on a GPU where there is one (mega_device from mega-lm's pytest plugin)."""
    g = torch.Generator().manual_seed(0)
    h = torch.randn(4, 3, 8, generator=g, dtype=torch.float64).to(mega_device)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]], device=mega_device)
    module = get_hiddens_module({"transform": [{"p": {"cls_name": "seq_pool", "input_name": "hiddens"}}],
                                 "loss": {"nce": {"cls_name": "info_nce", "query": "hiddens_pooled",
                                                  "key": "hiddens_pooled", "temperature": 0.5}}})
    d = module.apply_loss_transforms(module.apply_hidden_transforms({"hiddens": h, "hiddens_mask": mask}))
    pooled = torch.stack([h[: int(mask[b].sum()), b].mean(0) for b in range(3)])
    unit = pooled / pooled.norm(dim=-1, keepdim=True)
    sims = unit @ unit.T / 0.5
    expected = torch.stack([-(sims[b, b] - torch.logsumexp(sims[b], 0)) for b in range(3)])
    torch.testing.assert_close(d["hiddens_nce_loss"], expected)
    assert d["hiddens_nce_loss"].device.type == mega_device


def test_an_experiment_trains_with_it_by_name(tmp_path, mega_corpus):
    corpus = mega_corpus  # from mega-lm's pytest plugin (mega.testing)
    exp = tmp_path / "exp.toml"
    exp.write_text(f"""
[trainer]
max_steps = 3
val_check_interval = 3
limit_val_batches = 1
log_every_n_steps = 1
[exp_manager]
exp_dir = "{tmp_path}"
name = "nce"
loggers = ["jsonl"]
[model]
name = "bart"
micro_batch_size = 4
seq_length = 24
seq_length_dec = 16
[model.encoder]
num_layers = 1
hidden_size = 16
num_attention_heads = 2
[model.decoder]
num_layers = 1
hidden_size = 16
num_attention_heads = 2
[model.tokenizer]
library = "bytes"
[model.data]
data_prefix = ["{corpus}"]
splits_string = "80,20,0"
[model.hiddens]
enc_output_name = "z"
[[model.hiddens.transform]]
q = {{ cls_name = "cond_gaussian", hidden_size = 16 }}
[[model.hiddens.transform]]
pool_z = {{ cls_name = "seq_pool", input_name = "z" }}
pool_h = {{ cls_name = "seq_pool", input_name = "hiddens" }}
[model.hiddens.loss.nce]
cls_name = "info_nce"
loss_weight = 0.1
""")
    assert run_cli(["run", str(exp)]) == 0
    lines = [json.loads(l) for l in (tmp_path / "nce" / "metrics.jsonl").read_text().splitlines()]
    assert all("hiddens_nce_loss" in l and math.isfinite(l["hiddens_nce_loss"]) for l in lines if "loss" in l)

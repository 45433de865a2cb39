"""The `megatron` checkpoint format: Megatron-LM's directory layout, top-level keys and
legacy key names (specs/checkpoints.md); checkpoints written by Megatron-LM in older QKV
layouts load into the same model."""
from __future__ import annotations

import argparse

import pytest
import torch

from mega.plugins.checkpoints.megatron import MegatronFormat, nest, qkv_to_current, rank_folder
from mega.runtime.parallel import ParallelState
from mega.testing import read_metrics, tiny_config
from mega.training.loop import train
from mega.training.run import build_run


def test_layout_keys_and_resume(tmp_path, corpus, plugins):
    cfg = tiny_config(tmp_path, corpus, plugins, trainer={"max_steps": 4, "val_check_interval": 0},
                      exp_manager={"checkpoint": {"format": "megatron"}})
    run = build_run(cfg, plugins)
    train(run)
    root = run.run_dir / "checkpoints"
    assert (root / "latest_checkpointed_iteration.txt").read_text().strip() == "4"
    f = root / "iter_0000004" / "mp_rank_00" / "model_optim_rng.pt"
    torch.serialization.add_safe_globals([argparse.Namespace])
    ckpt = torch.load(f, weights_only=True)
    assert {"args", "checkpoint_version", "iteration", "model", "optimizer", "opt_param_scheduler", "rng_state"} <= set(ckpt)
    assert ckpt["checkpoint_version"] == 3.0 and ckpt["iteration"] == 4
    args = ckpt["args"]
    assert (args.num_layers, args.hidden_size, args.num_attention_heads, args.padded_vocab_size) == (2, 32, 4, 264)
    assert args.tensor_model_parallel_size == 1 and args.max_position_embeddings == 32
    lm = ckpt["model"]["language_model"]
    assert set(lm["embedding"]) == {"word_embeddings", "position_embeddings"}
    assert lm["embedding"]["word_embeddings"]["weight"].shape == (264, 32)
    enc = lm["encoder"]
    for key in ("layers.0.input_layernorm.weight", "layers.1.self_attention.query_key_value.weight",
                "layers.0.self_attention.dense.bias", "layers.0.mlp.dense_h_to_4h.weight",
                "layers.0.mlp.dense_4h_to_h.weight", "layers.0.post_attention_layernorm.bias", "final_layernorm.weight"):
        assert key in enc
    assert {"torch_rng_state", "rng_tracker_states"} <= set(ckpt["rng_state"][0])
    again = build_run(tiny_config(tmp_path, corpus, plugins, ["trainer.max_steps=6"], trainer={"val_check_interval": 0},
                                  exp_manager={"checkpoint": {"format": "megatron"}}), plugins)
    assert again.step == 4 and again.resumed_from.name == "iter_0000004"
    train(again)
    assert [m["step"] for m in read_metrics(again.run_dir)] == [1, 2, 3, 4, 5, 6]


def test_rank_folders_follow_megatron():
    assert rank_folder(tmp := __import__("pathlib").Path("x"), ParallelState(tp_size=2, tp_rank=1)) == tmp / "mp_rank_01"
    assert rank_folder(tmp, ParallelState(tp_size=2, tp_rank=1, pp_size=4, pp_rank=2)) == tmp / "mp_rank_01_002"


def _to_version(t: torch.Tensor, version: float, heads: int) -> torch.Tensor:
    """Our [heads, 3, head_dim] rows in an older checkpoint_version's order (the inverse of
    the reader, written independently from the spec's layouts)."""
    rest = t.shape[1:]
    hd = t.shape[0] // (3 * heads)
    per_head = t.view(heads, 3, hd, *rest)
    if version == 0:
        return per_head.permute(1, 0, 2, *range(3, 3 + len(rest))).reshape(t.shape)  # [3, heads, hd]
    return per_head.permute(0, 2, 1, *range(3, 3 + len(rest))).reshape(t.shape)  # [heads, hd, 3]


@pytest.mark.parametrize("version", [0, 1.0])
def test_reads_older_megatron_checkpoints(tmp_path, plugins, version):
    from mega.config import config_from_dict
    from mega.plugins.models.gpt import GPTModel

    cfg = config_from_dict({"model": {"num_layers": 2, "hidden_size": 32, "num_attention_heads": 4, "seq_length": 16,
                                      "make_vocab_size_divisible_by": 16, "hidden_dropout": 0.0,
                                      "attention_dropout": 0.0}}, plugins=plugins).model
    torch.manual_seed(0)
    original = GPTModel(cfg, 50).eval()
    flat = {k: (_to_version(v, version, 4) if "query_key_value" in k else v) for k, v in original.state_dict().items()}
    model = nest(flat)
    model["language_model"]["transformer"] = model["language_model"].pop("encoder")  # the oldest naming
    folder = tmp_path / "release" / "mp_rank_00"
    folder.mkdir(parents=True)
    args = argparse.Namespace(num_attention_heads=4, tensor_model_parallel_size=1, hidden_size=32, num_layers=2)
    torch.save({"args": args, "checkpoint_version": version, "iteration": 7, "model": model}, folder / "model_optim_rng.pt")

    state = MegatronFormat().load(tmp_path / "release")
    assert state["trainer"]["step"] == 7
    torch.manual_seed(1)
    loaded = GPTModel(cfg, 50).eval()
    loaded.load_state_dict(state["model"])
    tokens = torch.randint(0, 50, (2, 16))
    torch.testing.assert_close(loaded(tokens), original(tokens), rtol=0, atol=0)


def test_qkv_reorder_is_identity_for_current_versions():
    t = torch.arange(24.0).view(12, 2)
    assert torch.equal(qkv_to_current(t, 3.0, 2), t)


def test_not_a_megatron_checkpoint_is_named(tmp_path):
    from mega.errors import CheckpointError

    (tmp_path / "mp_rank_00").mkdir()
    torch.save({"weights": torch.zeros(1)}, tmp_path / "mp_rank_00" / "model_optim_rng.pt")
    with pytest.raises(CheckpointError, match="model_optim_rng.pt: has no 'model' entry"):
        MegatronFormat().load(tmp_path)

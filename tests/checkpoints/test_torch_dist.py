"""The `torch_dist` checkpoint format: megatron-core's key names in a torch.distributed.checkpoint
store, a bit-exact round trip in one process, and loading at other tensor/pipeline sizes
where each rank reads only its own slices (gloo, CPU; each subprocess with a timeout)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import tomli_w
import torch

from mega.testing import deep_update, read_metrics, tiny_raw
from mega.testing import run_ranks

ROOT = Path(__file__).resolve().parents[2]
TORCH_DIST = {"checkpoint": {"format": "torch_dist"}}


def _equal(a, b, where="state"):
    """Recursive bit-exact comparison (tensors: same dtype, shape and bits)."""
    if torch.is_tensor(a):
        assert torch.is_tensor(b) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), (where, sorted(map(str, a)), sorted(map(str, b)))
        for k in a:
            _equal(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _equal(x, y, f"{where}[{i}]")
    else:
        assert a == b, (where, a, b)


def _latest(run_dir: Path) -> Path:
    return run_dir / "checkpoints" / (run_dir / "checkpoints" / "latest").read_text().strip()


# --- one process -----------------------------------------------------------------------------


@pytest.mark.slow
def test_single_process_round_trip_is_bit_exact_and_resume_equals_uninterrupted(tmp_path, corpus, plugins):
    from mega.config import config_from_dict
    from mega.checkpoint import verify
    from mega.training.run import run as train

    def config(name, steps):
        raw = tiny_raw(tmp_path, corpus, trainer={"max_steps": steps}, exp_manager={"name": name, **TORCH_DIST})
        return config_from_dict(raw, [], plugins)

    r = train(config("resumed", 2), plugins)
    ckpt = _latest(r.run_dir)
    assert verify(ckpt)["format"] == "torch_dist"
    fmt = plugins.checkpoint_formats.get("torch_dist").factory()
    loaded = fmt.load(ckpt)
    state = r.state()
    _equal(state["model"], loaded["model"], "model")
    _equal(state["optimizer"], loaded["optimizer"], "optimizer")
    _equal(state["trainer"], loaded["trainer"], "trainer")
    # The kernel's resume path (same layout) continues bit for bit, dropout included.
    straight = train(config("straight", 4), plugins)
    resumed = train(config("resumed", 4), plugins)
    assert resumed.resumed_from == ckpt
    a = [(m["step"], m["loss"]) for m in read_metrics(straight.run_dir) if "loss" in m]
    b = [(m["step"], m["loss"]) for m in read_metrics(resumed.run_dir) if "loss" in m]
    assert a == b
    _equal(straight.state()["model"], resumed.state()["model"], "model")


def test_per_layer_files_still_load(tmp_path, monkeypatch):
    """Files written before the stacked layout (and megatron-core's `non_homogeneous_layers`
    ones) hold `decoder.layers.{i}.X` keys: read them, weights and moments alike."""
    from mega.plugins.checkpoints import torch_dist
    from mega.plugins.checkpoints.torch_dist import TorchDistFormat

    monkeypatch.setattr(torch_dist, "_stacked", lambda key: None)  # write the per-layer layout
    model, opt = _trained_tp1(str(tmp_path), {"model": {"name": "gpt"}})  # megatron-core's names
    monkeypatch.undo()
    from torch.distributed.checkpoint import FileSystemReader

    md = FileSystemReader(str(tmp_path)).read_metadata().state_dict_metadata
    assert "decoder.layers.1.self_attention.linear_qkv.weight" in md and "decoder.layers.mlp.linear_fc1.weight" not in md
    loaded = TorchDistFormat().load(tmp_path)
    _equal(model.state_dict(), loaded["model"], "model")
    _equal(opt.state_dict()["state"], loaded["optimizer"]["state"], "optimizer")


def test_files_use_megatron_core_names_and_metadata(tmp_path, corpus, plugins):
    from torch.distributed.checkpoint import FileSystemReader

    from mega.config import config_from_dict
    from mega.training.run import run as train

    raw = tiny_raw(tmp_path, corpus, trainer={"max_steps": 1, "val_check_interval": 0}, exp_manager=TORCH_DIST)
    r = train(config_from_dict(raw, [], plugins), plugins)
    ckpt = _latest(r.run_dir)
    assert json.loads((ckpt / "metadata.json").read_text())["sharded_backend"] == "torch_dist"
    assert (ckpt / ".metadata").is_file() and list(ckpt.glob("*.distcp"))
    md = FileSystemReader(str(ckpt)).read_metadata().state_dict_metadata
    padded, h = 264, 32  # 258 byte ids padded to a multiple of 8
    expected = {
        "embedding.word_embeddings.weight": [padded, h],
        "embedding.position_embeddings.weight": [32, h],
        "decoder.final_layernorm.weight": [h], "decoder.final_layernorm.bias": [h],
    }
    p = "decoder.layers."  # megatron-core's homogeneous layers: one [layers, ...] tensor per name
    expected.update({
        p + "self_attention.linear_qkv.layer_norm_weight": [2, h], p + "self_attention.linear_qkv.layer_norm_bias": [2, h],
        p + "self_attention.linear_qkv.weight": [2, 3 * h, h], p + "self_attention.linear_qkv.bias": [2, 3 * h],
        p + "self_attention.linear_proj.weight": [2, h, h], p + "self_attention.linear_proj.bias": [2, h],
        p + "mlp.linear_fc1.layer_norm_weight": [2, h], p + "mlp.linear_fc1.layer_norm_bias": [2, h],
        p + "mlp.linear_fc1.weight": [2, 4 * h, h], p + "mlp.linear_fc1.bias": [2, 4 * h],
        p + "mlp.linear_fc2.weight": [2, h, 4 * h], p + "mlp.linear_fc2.bias": [2, h],
    })
    objects = {f"{p}{m}._extra_state/shard_{i}_2" for i in range(2)
               for m in ("self_attention.linear_qkv", "self_attention.linear_proj", "mlp.linear_fc1", "mlp.linear_fc2")}
    model_keys = {k for k in md if not k.startswith("optimizer.")}
    assert model_keys == set(expected) | objects  # the tied output layer is the embedding: no output_layer key
    for key, shape in expected.items():
        assert list(md[key].size) == shape, key
        assert list(md[f"optimizer.state.exp_avg.{key}"].size) == shape
        assert list(md[f"optimizer.state.step.{key}"].size) == (shape[:1] if key.startswith(p) else [])
    w = torch.load(ckpt / "mega_rank_00_000.pt", weights_only=True)
    assert w["trainer"]["step"] == 1


# --- several processes --------------------------------------------------------------------------


def _tiny_gpt_cfg():
    from mega.config import config_from_dict

    return config_from_dict({"model": {"num_layers": 2, "hidden_size": 32, "num_attention_heads": 4, "seq_length": 16,
                                       "make_vocab_size_divisible_by": 20, "hidden_dropout": 0.0,
                                       "attention_dropout": 0.0}}).model


def _trained_tp1(directory: str, config: dict = None):
    """A GPT (vocab 50, padded to 60 at TP=1 and to 80 at TP=2) after one AdamW step, saved
    in one process; returns its full state."""
    from mega.plugins.models.gpt import GPTModel
    from mega.runtime.parallel import ParallelState
    from mega.runtime.sharding import sharding_of
    from mega.plugins.checkpoints.torch_dist import TorchDistFormat
    from mega.training.run import param_groups

    torch.manual_seed(0)
    model = GPTModel(_tiny_gpt_cfg(), 50)
    opt = torch.optim.AdamW(param_groups(model, 0.1), lr=1e-2)
    tokens = torch.randint(0, 50, (2, 16), generator=torch.Generator().manual_seed(1))
    model.training_loss({"tokens": tokens, "labels": tokens, "loss_mask": torch.ones(2, 16)})["loss_sum"].backward()
    opt.step()
    state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "trainer": {"step": 1, "consumed_samples": 2},
             "sharding": sharding_of(model, ParallelState()), "config": config or {}}
    TorchDistFormat().save(state, Path(directory), None)
    return model, opt


def test_moments_follow_the_kernels_parameter_order_and_a_misorder_is_refused(tmp_path):
    """A frozen matrix (the position embedding) is in the model's state but not the
    optimizer's: its moments must be filed by the kernel's names, never by counting
    tensors; without those names, or with names in another order, saving is refused."""
    from mega.plugins.checkpoints.torch_dist import TorchDistFormat
    from mega.plugins.models.gpt import GPTModel
    from mega.errors import CheckpointError
    from mega.runtime.parallel import ParallelState
    from mega.runtime.sharding import optimizer_by_name, sharding_of
    from mega.checkpoint import optimizer_param_names
    from mega.training.run import param_groups

    torch.manual_seed(0)
    model = GPTModel(_tiny_gpt_cfg(), 50)
    dict(model.named_parameters())["language_model.embedding.position_embeddings.weight"].requires_grad_(False)
    opt = torch.optim.AdamW(param_groups(model, 0.1), lr=1e-2)
    tokens = torch.randint(0, 50, (2, 16), generator=torch.Generator().manual_seed(1))
    model.training_loss({"tokens": tokens, "labels": tokens, "loss_mask": torch.ones(2, 16)})["loss_sum"].backward()
    opt.step()
    names = optimizer_param_names(model)
    state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "trainer": {"step": 1},
             "sharding": sharding_of(model, ParallelState()), "config": {}}
    fmt = TorchDistFormat()
    (tmp_path / "a").mkdir()
    with pytest.raises(CheckpointError, match="cannot tell which parameter each optimizer entry belongs to"):
        fmt.save(state, tmp_path / "a")
    swapped = list(names)
    i, j = names.index("language_model.embedding.word_embeddings.weight"), names.index(
        "language_model.encoder.layers.0.self_attention.query_key_value.weight")
    swapped[i], swapped[j] = swapped[j], swapped[i]
    with pytest.raises(CheckpointError, match=r"does not fit .*the parameter order is not the model's"):
        fmt.save({**state, "param_names": swapped}, tmp_path / "a")

    fmt.save({**state, "param_names": names}, tmp_path / "a")
    want = optimizer_by_name(opt.state_dict(), names)
    assert "language_model.embedding.position_embeddings.weight" not in want
    loaded = fmt.load(tmp_path / "a")
    _equal(optimizer_by_name(loaded["optimizer"], names), want, "same layout")
    torch.manual_seed(5)
    fresh = GPTModel(_tiny_gpt_cfg(), 50)
    dict(fresh.named_parameters())["language_model.embedding.position_embeddings.weight"].requires_grad_(False)
    resharded = fmt.load_resharded(tmp_path / "a", ParallelState(), fresh, torch.optim.AdamW(param_groups(fresh, 0.1)))
    _equal(optimizer_by_name(resharded["optimizer"], optimizer_param_names(fresh)), want, "resharded")


def test_mcore_names_go_both_ways_from_one_table():
    from mega.plugins.checkpoints.megatron.layout import current_name
    from mega.plugins.models.gpt_interop import mcore as mcore_names
    from mega.plugins.models.gpt_interop import nemo as gpt_nemo

    def nemo_name(name):  # as the nemo format reads a weight: Megatron's current spelling, then GPT's names
        return gpt_nemo.mega_name(current_name(name))
    from mega.plugins.models.gpt import GPTModel

    for name in GPTModel(_tiny_gpt_cfg(), 50).state_dict():
        key = mcore_names.mcore_name(name)
        assert mcore_names.mega_name(key) == name, (name, key)
    assert mcore_names.mcore_name("language_model.encoder.layers.7.mlp.dense_h_to_4h.bias") == "decoder.layers.7.mlp.linear_fc1.bias"
    assert mcore_names.mcore_name("language_model.encoder.final_layernorm.weight") == "decoder.final_layernorm.weight"
    # the NeMo importer reads mcore_gpt names through the same table, legacy names through Megatron's
    assert nemo_name("decoder.layers.3.pre_mlp_layernorm.bias") == "language_model.encoder.layers.3.post_attention_layernorm.bias"
    assert nemo_name("language_model.transformer.layers.0.attention.dense.weight") == \
        "language_model.encoder.layers.0.self_attention.dense.weight"


def _load_at_layout(parallel, directory):
    """Build the model at this rank's layout and load the TP=1 checkpoint resharded."""
    from mega.plugins.models.gpt import GPTModel
    from mega.plugins.checkpoints.torch_dist import TorchDistFormat
    from mega.runtime.sharding import optimizer_by_name
    from mega.checkpoint import load_resharded, optimizer_param_names
    from mega.training.run import param_groups

    torch.manual_seed(123)  # other initial values: everything must come from the checkpoint
    model = GPTModel(_tiny_gpt_cfg(), 50)
    opt = torch.optim.AdamW(param_groups(model, 0.1), lr=1e-2)
    manifest = {"tensor_model_parallel_size": 1, "pipeline_model_parallel_size": 1}
    state = load_resharded(TorchDistFormat(), Path(directory), manifest, parallel, model, opt)
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    names = optimizer_param_names(model)
    return (model.pipeline_layer_offset, model.state_dict(), optimizer_by_name(opt.state_dict(), names),
            state["trainer"])


@pytest.mark.slow
def test_tp1_checkpoint_loads_at_tp2_and_pp2_reading_only_each_ranks_slices(tmp_path):
    from mega.runtime.sharding import optimizer_by_name
    from mega.checkpoint import optimizer_param_names

    model, opt = _trained_tp1(str(tmp_path))
    full = model.state_dict()
    moments = optimizer_by_name(opt.state_dict(), optimizer_param_names(model))
    params = dict(model.named_parameters())

    def expect(name, tensor, tp_rank, local):  # this rank's slice; vocab padding 60 -> 80 zero-filled
        dim = params[name].partition_dim
        if dim is None:
            return tensor
        if name.endswith("word_embeddings.weight"):
            tensor = torch.cat([tensor, tensor.new_zeros(80 - tensor.shape[0], *tensor.shape[1:])])
        return tensor.chunk(2, dim=dim)[tp_rank]

    for rank, (_, state, opt_state, trainer) in enumerate(run_ranks(_load_at_layout, world=2, tp=2, args=(str(tmp_path),))):
        assert trainer == {"step": 1, "consumed_samples": 2}
        assert state.keys() == full.keys()
        for name, value in state.items():
            assert torch.equal(value, expect(name, full[name], rank, value)), (rank, name)
            for k in ("exp_avg", "exp_avg_sq"):
                assert torch.equal(opt_state[name][k], expect(name, moments[name][k], rank, value)), (rank, name, k)
            assert torch.equal(opt_state[name]["step"], moments[name]["step"])

    stages = run_ranks(_load_at_layout, world=2, pp=2, args=(str(tmp_path),))
    for stage, (offset, state, opt_state, _) in enumerate(stages):
        assert offset == stage
        for name, value in state.items():
            source = ("language_model.embedding.word_embeddings.weight" if name == "word_embeddings_for_head.weight"
                      else name.replace("layers.0.", f"layers.{offset}."))
            assert torch.equal(value, full[source]), (stage, name)
            assert torch.equal(opt_state[name]["exp_avg_sq"], moments[source]["exp_avg_sq"]), (stage, name)
    assert "word_embeddings_for_head.weight" in stages[1][1]


def _mega(args, cwd, timeout=300):
    env = {**os.environ, "PYTHONPATH": f"{cwd}{os.pathsep}{ROOT}"}
    env.pop("RANK", None)
    proc = subprocess.run([sys.executable, "-m", "mega", "run", *args], capture_output=True, text=True, timeout=timeout,
                          cwd=cwd, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


@pytest.mark.slow
def test_tp2_checkpoint_resumes_at_tp1_and_pp2_like_an_uninterrupted_run(tmp_path, corpus):
    """Saved by 2 tensor-parallel ranks at step 2, resumed at TP=1 (one process) and at
    PP=2 (two stages): steps 3 and 4 match an uninterrupted run (weights and AdamW moments
    carried; 258 byte ids pad to 260 at any TP with this multiple)."""
    raw = tiny_raw(tmp_path, corpus, trainer={"max_steps": 4, "val_check_interval": 0, "accelerator": "cpu"},
                   exp_manager={"checkpoint": {"format": "torch_dist", "every_n_train_steps": 2}},
                   model={"hidden_dropout": 0.0, "attention_dropout": 0.0, "make_vocab_size_divisible_by": 130})
    exp = tmp_path / "exp.toml"
    exp.write_text(tomli_w.dumps(raw))
    results = tmp_path / "results"
    from mega.config import config_from_dict
    from mega.plugin_manager import get_plugins
    from mega.training.run import run as train

    # the one-process reference in this process (the runs under test are the launched ones below)
    train(config_from_dict({**raw, "exp_manager": {**raw["exp_manager"], "name": "straight"}}, [], get_plugins()),
          get_plugins())
    _mega([str(exp), "exp_manager.name=tp1", "trainer.max_steps=2", "trainer.devices=2",
           "model.tensor_model_parallel_size=2"], tmp_path)
    assert (_latest(results / "tp1") / ".metadata").is_file()
    shutil.copytree(results / "tp1", results / "pp2")
    at_tp1 = _mega([str(exp), "exp_manager.name=tp1"], tmp_path)
    at_pp2 = _mega([str(exp), "exp_manager.name=pp2", "trainer.devices=2", "model.pipeline_model_parallel_size=2"], tmp_path)
    for proc in (at_tp1, at_pp2):
        assert "resumed from" in proc.stderr and "resharding" in proc.stderr
    ref = {m["step"]: m for m in read_metrics(results / "straight") if "loss" in m}
    for name in ("tp1", "pp2"):
        got = [m for m in read_metrics(results / name) if "loss" in m]
        assert [m["step"] for m in got] == [1, 2, 3, 4]
        for m in got:
            assert m["loss"] == pytest.approx(ref[m["step"]]["loss"], rel=1e-5, abs=1e-6), (name, m["step"])

"""The distributed optimizer (`model.optim.use_distributed_optimizer`, megatron-core's
`DistributedOptimizer`, docs/parallelism.md) against references:

* the buffer layout: Megatron's rule, transcribed (the worked example of its 64-element
  alignment, bucket-end padding, shared-embedding bucket, and every rank's shards);
* one process: bitwise the plain optimizer (fp32 and O2), the state it leaves counted
  tensor by tensor == `mega plan`, the fp32 originals freed under O2; a negative control
  (shards off by one element) fails the comparison;
* config errors before anything starts; NeMo's optimizer names; checkpoint layouts
  (Megatron's `distrib_optim.pt`, torch_dist's `dp_reshardable` bucket space, checked from
  their structures) and loads between distributed and plain runs in every format;
* gloo, 2 and 4 processes (one slow test, two launches): DP=2/DP=4/TP=2xDP=2/PP=2xDP=2
  against the plain optimizer at the same layout, fp32 (DDP), O2 with buckets and both
  overlaps, clipping, LAMB, BERT, T5 and Transformer-XL; checkpoints of every format saved
  at DP=1, 2 and 4 resume at the others with the same next-step loss.
"""
from __future__ import annotations

import copy
import gc
import math
import random
import shutil
import weakref
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from attrs import define

import mega
from mega.config import OptimConfig, config_from_dict
from mega.errors import ConfigError
from mega.plan import counted_state_bytes, estimate
from mega.runtime.bucket_space import BucketSpace, world_reader
from mega.runtime.param_layout import ParamLayout, compute_layout
from mega.testing import WORDS, deep_update, register_plugin, tiny_raw
from mega.training.loop import train_step
from mega.training.run import build_run

DIST = "model.optim.use_distributed_optimizer=true"
NO_DROPOUT = {"hidden_dropout": 0.0, "attention_dropout": 0.0}
FORMATS = ("native", "torch_dist", "megatron")


# --- the layout: Megatron's rule ------------------------------------------------------------------


def test_layout_is_megatrons_worked_example():
    """Parameters A (100), B (30), C (1000) registered in that order, buckets of 500, d = 4
    (scale.md §2.2, transcribed from _compute_per_buffer_param_layout and
    _build_model_gbuf_range): reverse order, starts aligned to 64, bucket ends padded to
    lcm(4, 128); the ranks own 286, 320, 292 and 232 parameter elements."""
    layout = compute_layout([100, 30, 1000], 500, 4)
    assert layout.param_index_map == ((1088, 1188, 1), (1024, 1054, 1), (0, 1000, 0))
    assert layout.bucket_indices == ((0, 1024), (1024, 1280))
    assert layout.per_bucket_numel_unpadded == (1000, 164)
    owned = [[(o.index, o.buffer_start, o.buffer_end, o.param_start, o.param_end) for o in layout.owned(r)] for r in range(4)]
    assert owned == [[(2, 0, 256, 0, 256), (1, 1024, 1054, 0, 30)],
                     [(2, 256, 512, 256, 512), (0, 1088, 1152, 0, 64)],
                     [(2, 512, 768, 512, 768), (0, 1152, 1188, 64, 100)],
                     [(2, 768, 1000, 768, 1000)]]
    assert [layout.owned_numel(r) for r in range(4)] == [286, 320, 292, 232] and layout.max_owned_numel() == 320
    # d = 3: lcm(3, 128) = 384 moves the second bucket, so its parameters move too
    three = compute_layout([100, 30, 1000], 500, 3)
    assert three.bucket_indices == ((0, 1152), (1152, 1536)) and three.per_bucket_numel_unpadded == (1000, 164)
    assert three.param_index_map == ((1216, 1316, 1), (1152, 1182, 1), (0, 1000, 0))
    assert not three.same_buckets(layout)
    # one bucket (no overlap): no bucket ends in between, the end padded once
    one = compute_layout([100, 30, 1000], None, 4)
    assert one.bucket_indices == ((0, 1280),) and one.per_bucket_numel_unpadded == (1188,)


def test_layout_shared_embedding_bucket_and_high_bandwidth_padding():
    """A tied word embedding shared across pipeline stages closes the bucket before it and
    gets its own (wherever it sits); pad_high pads bucket ends to lcm(d, 128, 2^16)."""
    first = compute_layout([1000, 10, 20], None, 2, shared=[0])  # first stage: the embedding is registered first
    assert first.param_index_map == ((128, 1128, 1), (64, 74, 0), (0, 20, 0))
    assert first.bucket_indices == ((0, 128), (128, 1152)) and first.per_bucket_numel_unpadded == (128, 1000)
    last = compute_layout([10, 20, 1000], None, 2, shared=[2])  # last stage: the head's copy is registered last
    assert last.param_index_map[2] == (0, 1000, 0) and last.bucket_indices[0] == (0, 1024)
    assert compute_layout([1000], None, 2, pad_high=True).bucket_indices == ((0, 65536),)


@pytest.mark.parametrize("d", [1, 2, 3, 4, 5, 8])
def test_every_element_is_owned_once_and_only_d_dividing_128_keep_the_layout(d):
    """The shards of all ranks tile every parameter element exactly once; for d dividing
    128 the layout is d = 1's (only the end padding depends on d, and it is lcm(d, 128))."""
    random.seed(d)
    numels = [random.choice([1, 7, 64, 130, 1000, 4096]) for _ in range(40)]
    layout = compute_layout(numels, 3000, d, shared=[0])
    seen = [torch.zeros(n, dtype=torch.int32) for n in numels]
    for r in range(d):
        for o in layout.owned(r):
            seen[o.index][o.param_start:o.param_end] += 1
            assert 0 <= o.buffer_start - layout.shard_start(o.bucket, r) and o.numel <= layout.shard_size(o.bucket)
    assert all(bool((s == 1).all()) for s in seen)
    assert layout.same_buckets(compute_layout(numels, 3000, 1, shared=[0])) == (128 % d == 0)
    assert ParamLayout.from_record(layout.record([str(i) for i in range(len(numels))], [[n] for n in numels])) == layout


# --- one process ------------------------------------------------------------------------------------


def _experiment(tmp_path, corpus, plugins, name, *overrides, o2=False, devices=1, steps=4, **model):
    return config_from_dict(tiny_raw(
        tmp_path, corpus, model={"megatron_amp_O2": o2, **NO_DROPOUT, "micro_batch_size": 2, "global_batch_size": 8,
                                 "make_vocab_size_divisible_by": 130, **model},
        trainer={"precision": "bf16" if o2 else "32", "accelerator": "cpu", "devices": devices, "max_steps": steps,
                 "val_check_interval": 0, "gradient_clip_val": 0.0, "dist_timeout_s": 120},
        exp_manager={"name": name}), list(overrides), plugins)


def _steps(run, n):
    out = []
    for _ in range(n):
        m = train_step(run)
        run.step += 1
        out.append((float(m["loss"]), float(m["grad_norm"])))
    return out


def _model_space(run):
    """(fp32 weights, optimizer moments by parameter name) as the run's checkpoints hold them."""
    from mega.checkpoint import optimizer_param_names
    from mega.runtime.bucket_space import model_space_per_parameter

    weights = {k: v.clone() for k, v in run.model_state_dict().items()}
    opt = copy.deepcopy(run.optimizer.state_dict())  # a plain optimizer's state dict holds its live tensors
    return weights, model_space_per_parameter(opt, optimizer_param_names(run.model))


def _max_diff(a, b):
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


def _moments_diff(a, b):
    assert a.keys() == b.keys()
    return max(float((a[n][k].double() - b[n][k].double()).abs().max()) for n in a for k in a[n] if torch.is_tensor(a[n][k]))


@pytest.mark.parametrize("o2", [False, True], ids=["fp32", "O2"])
def test_one_rank_is_the_plain_optimizer_bit_for_bit_and_the_plan_counts_its_tensors(tmp_path, corpus, plugins, o2,
                                                                                    monkeypatch):
    """d = 1, 3 steps of 4 micro-batches, buckets of 4096 elements, no clipping: losses,
    weights and moments equal the plain optimizer's bit for bit (grad norms within 1e-6) (each shard is its whole parameter,
    stepped by the same kernel); the state after a step, counted tensor by tensor, is what
    `mega plan` says to the byte (padding included); under O2 the original fp32 weights
    are gone (only the shards' clones remain). Negative control: main shards cut one
    element off their place in the buffers no longer match."""
    keys = ["model.grad_reduce_bucket_size=4096"]
    plain = build_run(_experiment(tmp_path, corpus, plugins, "plain", *keys, o2=o2), plugins)
    a = _steps(plain, 3)
    dist = build_run(_experiment(tmp_path, corpus, plugins, "dist", DIST, *keys, o2=o2), plugins)
    original = weakref.ref(next(dist.model.parameters()))
    b = _steps(dist, 3)
    assert [x[0] for x in a] == [x[0] for x in b]  # losses bit for bit
    assert [x[1] for x in b] == pytest.approx([x[1] for x in a], rel=1e-6)  # the norm sums shards in another order
    (wa, ma), (wb, mb) = _model_space(plain), _model_space(dist)
    assert _max_diff(wa, wb) == 0.0 and _moments_diff(ma, mb) == 0.0
    gc.collect()
    assert (original() is None) == o2  # O2: the fp32 parameter was replaced and freed; fp32: it is the buffer's view
    counted = counted_state_bytes(dist.model, dist.optimizer, dist.main_params)
    est = estimate(dist.config, dist.model.vocab_size)
    r = est["rank"]
    assert r["exact"] and r["buffer_numel"] == dist.main_params.layout.numel > r["params"]
    assert r["owned_numel"] == r["params"]  # one rank owns everything
    assert r["weights"] == counted["params"] + counted["main params"] and r["grads"] == counted["main grads"]
    assert r["optimizer"] == counted["optimizer"] and r["state"] == counted["total"]

    # negative control: a one-element shift of the owned ranges is caught
    from mega.runtime import param_layout

    owned = param_layout.ParamLayout.owned

    def shifted(self, rank):  # the first shard's range in the buffers one element late
        first, *rest = owned(self, rank)
        return [param_layout.Owned(first.index, first.bucket, first.buffer_start + 1, first.buffer_end + 1,
                                   first.param_start, first.param_end)] + rest

    monkeypatch.setattr(param_layout.ParamLayout, "owned", shifted)
    wrong = build_run(_experiment(tmp_path, corpus, plugins, "wrong", DIST, *keys, o2=o2), plugins)
    _steps(wrong, 3)
    monkeypatch.undo()
    assert _max_diff(wa, _model_space(wrong)[0]) > 0


@define(kw_only=True)
class PlainSGDConfig(OptimConfig):
    name: str = "plain_sgd"


class _PlainSGD:
    """A third-party optimizer whose plugin says nothing about sharding."""

    @mega.hookimpl
    def register_optimizers(self, register):
        register("plain_sgd", lambda config, groups: torch.optim.SGD(groups, lr=config.lr), config=PlainSGDConfig)


@pytest.mark.parametrize("keys,message", [
    ({"optim": {"name": "fused_lamb", "use_distributed_optimizer": True}},
     r"model.optim.name = 'fused_lamb' cannot be sharded.*optimizers that can: adamw, distributed_fused_adam, lamb,"
     r" mcore_distributed_optim"),
    ({"optim": {"name": "plain_sgd", "use_distributed_optimizer": True}}, r"model.optim.name = 'plain_sgd' cannot be sharded"),
    ({"optim": {"use_distributed_optimizer": True, "overlap_grad_sync": False, "overlap_param_sync": True}},
     r"model.optim.overlap_param_sync = true needs model.optim.overlap_grad_sync = true"),
    ({"optim": {"overlap_param_sync": True}}, r"overlap_param_sync = true needs model.optim.use_distributed_optimizer"),
    ({"optim": {"use_distributed_optimizer": True, "grad_sync_dtype": "bf16"}}, r"model.optim.grad_sync_dtype: only 'fp32'"),
    ({"optim": {"contiguous_grad_buffer": False}}, r"model.optim.contiguous_grad_buffer: only True"),
    ({"optim": {"bucket_cap_mb": 25}}, r"model.optim.bucket_cap_mb: unknown key; .*model.grad_reduce_bucket_size"),
    ({"ddp_bucket_size": 25}, r"model.ddp_bucket_size: unknown key; mega's key is model.grad_reduce_bucket_size"),
], ids=["fused_lamb", "third_party", "param_sync_without_grad_sync", "param_sync_without_switch", "bf16_reduce",
        "not_contiguous", "bucket_cap_mb", "ddp_bucket_size"])
def test_bad_combinations_are_config_errors_naming_the_keys(tmp_path, corpus, keys, message):
    with register_plugin(_PlainSGD()) as plugins:
        with pytest.raises(ConfigError, match=message):
            config_from_dict(tiny_raw(tmp_path, corpus, model=keys), [], plugins)


def test_a_refused_run_starts_no_worker(tmp_path, corpus, capsys):
    """`mega run ... trainer.devices=2` with an optimizer that cannot be sharded: exit 2,
    naming the key, before any worker (or run directory) exists."""
    import tomli_w

    from mega.cli import main

    exp = tmp_path / "exp.toml"
    exp.write_text(tomli_w.dumps(tiny_raw(tmp_path, corpus, trainer={"accelerator": "cpu"})))
    assert main(["run", str(exp), "trainer.devices=2", "model.optim.name=fused_lamb", DIST]) == 2
    assert "model.optim.name = 'fused_lamb' cannot be sharded" in capsys.readouterr().err
    assert not (tmp_path / "results").exists()


def test_nemo_names_are_adamw_with_the_switch_and_a_run_may_switch_between_them(tmp_path, corpus, plugins):
    """`distributed_fused_adam` and `mcore_distributed_optim` (NeMo 1) are `adamw` with
    use_distributed_optimizer on; a run started as `adamw` resumes under either name (and
    with the switch flipped), the same optimizer state."""
    from mega.training.loop import train

    for name in ("distributed_fused_adam", "mcore_distributed_optim"):
        cfg = _experiment(tmp_path, corpus, plugins, "x", f"model.optim.name={name}")
        assert cfg.model.optim.use_distributed_optimizer and cfg.model.optim.betas == [0.9, 0.95]
    first = build_run(_experiment(tmp_path, corpus, plugins, "switch", steps=2), plugins)
    train(first)
    second = build_run(_experiment(tmp_path, corpus, plugins, "switch", "model.optim.name=distributed_fused_adam", steps=3), plugins)
    assert second.step == 2 and second.main_params.sharded
    train(second)
    third = build_run(_experiment(tmp_path, corpus, plugins, "switch", steps=4), plugins)
    assert third.step == 3 and third.main_params is None
    with pytest.raises(ConfigError, match="model.optim.name: 'adamw' -> 'lamb'"):
        build_run(_experiment(tmp_path, corpus, plugins, "switch", "model.optim.name=lamb", steps=5), plugins)


def _latest(run_dir: Path) -> Path:
    return run_dir / "checkpoints" / (run_dir / "checkpoints" / "latest").read_text().strip()


def test_megatron_layout_is_distrib_optim_pt(tmp_path, corpus, plugins):
    """exp_manager.checkpoint.format = "megatron": the shards' state goes into Megatron's
    legacy `distrib_optim.pt` (coalesced buckets under the (param, grad) dtype key,
    `numel_unpadded`, fp32 `param` = the main weights), `model_optim_rng.pt`'s optimizer
    holds only param_groups with the step; a file built by hand from the §2.2 example
    (Megatron-LM's args, no layout record) unflattens to each parameter's tensors."""
    from mega.plugins.checkpoints.megatron_args import load_file
    from mega.plugins.checkpoints.megatron_distrib_optim import layout_from_args

    from mega.training.loop import train

    run = build_run(_experiment(tmp_path, corpus, plugins, "mg", DIST, "exp_manager.checkpoint.format=megatron",
                            "model.grad_reduce_bucket_size=4096", o2=True, steps=2), plugins)
    train(run)
    folder = _latest(run.run_dir) / "mp_rank_00"
    raw = torch.load(folder / "distrib_optim.pt", weights_only=True)
    assert raw["buckets_coalesced"] is True and list(raw[0]) == [(torch.bfloat16, torch.float32)]
    world = raw[0][(torch.bfloat16, torch.float32)]
    layout = run.main_params.layout
    assert world["numel_unpadded"] == sum(layout.per_bucket_numel_unpadded) and layout.num_buckets > 1
    assert set(world) == {"param", "exp_avg", "exp_avg_sq", "numel_unpadded"}
    assert all(world[k].dtype == torch.float32 and world[k].shape == (world["numel_unpadded"],) for k in ("param", "exp_avg"))
    weights = run.model_state_dict()
    name = "language_model.encoder.final_layernorm.bias"  # the last registered: first in the buffer, at 0
    assert torch.equal(world["param"][:weights[name].numel()], weights[name])
    model_file = load_file(folder / "model_optim_rng.pt", "model_optim_rng.pt")
    groups = model_file["optimizer"]["optimizer"]["param_groups"]
    assert set(model_file["optimizer"]) == {"optimizer"} and all("params" not in g and g["step"] == 2.0 for g in groups)

    # Megatron-LM's own file: A (100), B (30), C (1000), --ddp-bucket-size 500 at d = 4
    args = SimpleNamespace(data_parallel_size=4, overlap_grad_reduce=True, ddp_bucket_size=500)
    record = layout_from_args(["A", "B", "C"], [[100], [30], [10, 100]], args)
    value = {"A": torch.arange(100.0), "B": -torch.arange(30.0), "C": torch.ones(10, 100)}
    world = {k: torch.zeros(1164) for k in ("param", "exp_avg")}
    world["exp_avg"][:1000] = value["C"].reshape(-1)  # bucket 0: C; bucket 1 (offset 1000): B at 0, A at 1088 - 1024
    world["exp_avg"][1000:1030] = value["B"]
    world["exp_avg"][1064:1164] = value["A"]
    space = BucketSpace(dict(record, state_keys=["exp_avg"]), world_reader(world, ParamLayout.from_record(record)), {}, [])
    per_param = space.per_parameter(["exp_avg"])
    assert all(torch.equal(per_param[n]["exp_avg"], value[n]) for n in value)


def test_torch_dist_layout_is_dp_reshardable_bucket_space(tmp_path, corpus, plugins):
    """exp_manager.checkpoint.format = "torch_dist": megatron-core's `dp_reshardable`
    sharding: `content_metadata` says so in common.pt, one 1-D tensor per bucket and state
    key named as megatron-core names it, of the bucket's unpadded size."""
    import torch.distributed.checkpoint as dcp

    from mega.training.loop import train

    run = build_run(_experiment(tmp_path, corpus, plugins, "td", DIST, "exp_manager.checkpoint.format=torch_dist",
                            "model.grad_reduce_bucket_size=4096", o2=True, steps=2), plugins)
    train(run)
    ckpt = _latest(run.run_dir)
    common = torch.load(ckpt / "common.pt", weights_only=False)
    assert common["content_metadata"] == {"distrib_optim_sharding_type": "dp_reshardable"}
    meta = dcp.FileSystemReader(str(ckpt)).read_metadata().state_dict_metadata
    layout = run.main_params.layout
    prefix = "optimizer.distributed.dp_group_idx_0.gbuf_idx_0.dtype_(torch.bfloat16, torch.float32).bucket_idx_"
    for b, n in enumerate(layout.per_bucket_numel_unpadded):
        for key in ("param", "exp_avg", "exp_avg_sq"):
            assert list(meta[f"{prefix}{b}.{key}"].size) == [n]
    assert not any(k.startswith("optimizer.state.") for k in meta)  # no model-space moments


@pytest.mark.parametrize("fmt", FORMATS)
def test_checkpoints_load_between_distributed_and_plain_runs(tmp_path, corpus, plugins, fmt):
    """A plain AdamW checkpoint resumes under the distributed optimizer and the reverse, in
    every format: the state loaded (model space) is the state saved, bit for bit, and the
    next step is the uninterrupted run's."""
    for saver, loader in (("plain", "dist"), ("dist", "plain")):
        keys = [f"exp_manager.checkpoint.format={fmt}", "model.grad_reduce_bucket_size=4096"]
        switch = {"plain": [], "dist": [DIST]}
        first = build_run(_experiment(tmp_path, corpus, plugins, saver + loader, *switch[saver], *keys, o2=True, steps=3), plugins)
        _steps(first, 2)
        first.save_checkpoint()
        saved = _model_space(first)
        next_loss = _steps(first, 1)[0][0]
        second = build_run(_experiment(tmp_path, corpus, plugins, saver + loader, *switch[loader], *keys, o2=True, steps=3), plugins)
        assert second.step == 2
        if second.main_params is not None:
            second.main_params.prepare()  # the shards exist (and took their state) at the first step
        loaded = _model_space(second)
        assert _max_diff(saved[0], loaded[0]) == 0.0 and _moments_diff(saved[1], loaded[1]) == 0.0, (saver, loader)
        assert _steps(second, 1)[0][0] == next_loss

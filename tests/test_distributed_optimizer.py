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


def _experiment(tmp_path, corpus, plugins, name, *overrides, o2=False, devices=1, steps=4, precision=None, **model):
    return config_from_dict(tiny_raw(
        tmp_path, corpus, model={"megatron_amp_O2": o2, **NO_DROPOUT, "micro_batch_size": 2, "global_batch_size": 8,
                                 "make_vocab_size_divisible_by": 130, "native_amp_init_scale": 65536.0, **model},
        trainer={"precision": precision or ("bf16" if o2 else "32"), "accelerator": "cpu", "devices": devices,
                 "max_steps": steps,
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


@pytest.mark.parametrize("precision,o2", [
    pytest.param("32", False, id="fp32"), pytest.param("bf16", True, id="O2"),
    pytest.param("bf16", False, id="autocast", marks=pytest.mark.slow),
    pytest.param("16", True, id="O2-fp16", marks=pytest.mark.slow)])
def test_one_rank_is_the_plain_optimizer_bit_for_bit_and_the_plan_counts_its_tensors(tmp_path, corpus, plugins, o2,
                                                                                    precision, monkeypatch):
    """d = 1, 3 steps of 4 micro-batches, buckets of 4096 elements, no clipping, in fp32,
    O2 (bf16 and fp16 with its loss scaler), and bf16 autocast: losses, weights and moments
    equal the plain optimizer's bit for bit (grad norms within 1e-6) (each shard is its whole parameter,
    stepped by the same kernel); the state after a step, counted tensor by tensor, is what
    `mega plan` says to the byte (padding included); under O2 the original fp32 weights
    are gone (only the shards' clones remain). Negative control: main shards cut one
    element off their place in the buffers no longer match."""
    keys = ["model.grad_reduce_bucket_size=4096"]
    plain = build_run(_experiment(tmp_path, corpus, plugins, "plain", *keys, o2=o2, precision=precision), plugins)
    a = _steps(plain, 3)
    dist = build_run(_experiment(tmp_path, corpus, plugins, "dist", DIST, *keys, o2=o2, precision=precision), plugins)
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
    wrong = build_run(_experiment(tmp_path, corpus, plugins, "wrong", DIST, *keys, o2=o2, precision=precision), plugins)
    _steps(wrong, 1)
    monkeypatch.undo()
    first = build_run(_experiment(tmp_path, corpus, plugins, "first", *keys, o2=o2, precision=precision), plugins)
    _steps(first, 1)
    assert _max_diff(_model_space(first)[0], _model_space(wrong)[0]) > 0


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
    from mega.plugins.checkpoints.megatron.files import load_file
    from mega.plugins.checkpoints.megatron.distrib_optim import layout_from_args

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


# --- gloo: 2 and 4 processes ------------------------------------------------------------------------
#
# Every checkpoint below is saved after 2 steps of the same O2 run (bf16, buckets of 4096
# elements, dropout 0, no clipping, global batch 8) at DP = 1, 2 or 4 and resumed at the
# others; `dpA_fmt` is the run saved at DP = A, `dpAtoB_fmt` its copy resumed at DP = B.

CKPT = [DIST, "model.grad_reduce_bucket_size=4096"]


def _ckpt_config(d, corpus, plugins, name, fmt, devices, *extra):
    return _experiment(d, corpus, plugins, name, *CKPT, f"exp_manager.checkpoint.format={fmt}", *extra, o2=True,
                       devices=devices, steps=4)


def _saved_at_2(run):
    """2 steps, a checkpoint, the saved state (whole on data-parallel rank 0) and the next loss."""
    losses = _steps(run, 2)
    run.save_checkpoint()
    saved = _model_space(run)
    return losses + _steps(run, 1), saved


def _resumed(d, corpus, plugins, name, fmt, devices, *extra):
    """The state a run resumed from `name`'s checkpoint holds once its shards exist, and its next loss."""
    run = build_run(_ckpt_config(d, corpus, plugins, name, fmt, devices, *extra), plugins)
    assert run.step == 2, name
    if run.main_params is not None:
        run.main_params.prepare()
    return _model_space(run), _steps(run, 1)[0][0]


def _copy(d, source, target):
    shutil.copytree(d / "results" / source, d / "results" / target)


def _family_raw(d, family):
    """BERT (word pieces of a fixed vocabulary, sentences), T5 and Transformer-XL (LAMB)."""
    if family == "bert":
        raw = tiny_raw(d, d / "sentences.txt", model={"name": "bert", "tokenizer": {"library": "wordpiece",
                                                                                    "vocab_file": str(d / "vocab.txt")}})
    else:
        raw = tiny_raw(d, d / "corpus.txt")
        for k in ("num_layers", "hidden_size", "num_attention_heads", "hidden_dropout", "attention_dropout"):
            raw["model"].pop(k)
    stack = {"num_layers": 2, "hidden_size": 32, "num_attention_heads": 4, **NO_DROPOUT}
    keys = {"bert": NO_DROPOUT,
            "t5": {"name": "t5", "seq_length_dec": 16, "encoder": stack, "decoder": stack},
            "txl": {"name": "transformer_xl", "tgt_len": 16, "mem_len": 16, "n_layer": 2, "d_model": 32, "n_head": 2,
                    "d_head": 16, "d_inner": 64, "dropout": 0.0, "dropatt": 0.0, "cutoffs": [64, 128], "div_val": 2,
                    "data": {"data_impl": "lm_ordered"}, "optim": {"name": "lamb", "lr": 3e-3, "weight_decay": 0.0}}}[family]
    if family == "txl":
        raw["model"].pop("make_vocab_size_divisible_by")
        raw["model"].pop("seq_length")
    return deep_update(raw, {"model": {"micro_batch_size": 2, "global_batch_size": 4, **keys},
                             "trainer": {"accelerator": "cpu", "devices": 2, "gradient_clip_val": 0.0, "max_steps": 4,
                                         "dist_timeout_s": 120}})


def _write_family_files(d):
    rng = random.Random(0)

    def sentence():
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 10))).capitalize() + "."

    (d / "sentences.txt").write_text("\n".join(" ".join(sentence() for _ in range(rng.randint(3, 6))) for _ in range(120)))
    (d / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", *sorted(set(WORDS))]) + "\n")


def _four_ranks(state, d, corpus):
    """World 4: DP=4 (plain and distributed, the checkpoints), DP=1 checkpoints resumed at
    DP=4, TP=2 x DP=2 and PP=2 x DP=2 (plain and distributed), DP=4 checkpoints resumed at
    TP=2 x DP=2."""
    from mega.plugin_manager import load_plugins

    plugins = load_plugins()
    out = {}
    plain = build_run(_ckpt_config(d, corpus, plugins, "dp4_plain", "native", 4, "model.optim.use_distributed_optimizer=false"),
                      plugins)
    out["dp4_plain"] = _steps(plain, 4), _model_space(plain)
    for fmt in FORMATS:
        run = build_run(_ckpt_config(d, corpus, plugins, f"dp4_{fmt}", fmt, 4), plugins)
        losses, saved = _saved_at_2(run)
        if fmt == "native":  # on to the 4 steps of the plain run, and the state it leaves counted
            losses += _steps(run, 1)
            out["dp4_final"] = _model_space(run)
            out["dp4_counted"] = counted_state_bytes(run.model, run.optimizer, run.main_params)["total"]
            out["dp4_plan"] = estimate(run.config, run.model.vocab_size)["rank"]["state"]
        out[f"dp4_{fmt}"] = losses, saved
        out[f"dp1to4_{fmt}"] = _resumed(d, corpus, plugins, f"dp1to4_{fmt}", fmt, 4)
    state.barrier()
    if state.rank == 0:
        for fmt in FORMATS:
            _copy(d, f"dp4_{fmt}", f"dp4totp2_{fmt}")
    state.barrier()
    for fmt in FORMATS:
        model, loss = _resumed(d, corpus, plugins, f"dp4totp2_{fmt}", fmt, 4, "model.tensor_model_parallel_size=2")
        out[f"dp4totp2_{fmt}"] = model, loss
    for name, key in (("tp2", "model.tensor_model_parallel_size=2"), ("pp2", "model.pipeline_model_parallel_size=2")):
        for on in ("false", "true"):
            run = build_run(_ckpt_config(d, corpus, plugins, f"{name}_{on}", "native", 4, key,
                                         f"model.optim.use_distributed_optimizer={on}"), plugins)
            out[f"{name}_{on}"] = _steps(run, 3), _model_space(run)
    # the last stage's tied head lives in a module without a forward: gathered at the step's first hook
    run = build_run(_ckpt_config(d, corpus, plugins, "pp2_param_sync", "native", 4, "model.pipeline_model_parallel_size=2",
                                 "model.optim.overlap_param_sync=true"), plugins)
    out["pp2_param_sync"] = _steps(run, 3), _model_space(run)
    out["tp_rank"] = state.rank % 2  # TP=2 x DP=2: tensor-parallel ranks are adjacent
    return out


def _two_ranks(state, d, corpus):
    """World 2: DP=2 against the plain optimizer (fp32/DDP, O2 with buckets and overlaps,
    clipping, LAMB, BERT, T5, Transformer-XL), the DP=2 checkpoints, and DP=4 and DP=1
    checkpoints resumed at DP=2."""
    from mega.plugin_manager import load_plugins
    from mega.training.loop import validate

    plugins = load_plugins()
    out = {}

    def both(name, *keys, o2=True, steps=3, plugins=plugins):
        runs = []
        for on in ("false", "true"):
            run = build_run(_experiment(d, corpus, plugins, f"{name}_{on}", *keys, f"model.optim.use_distributed_optimizer={on}",
                                        o2=o2, devices=2), plugins)
            runs.append((_steps(run, steps), _model_space(run)))
        return runs

    out["fp32"] = both("fp32", o2=False)
    out["o2"] = both("o2", "model.grad_reduce_bucket_size=4096")
    out["o2_clip"] = both("o2_clip", "model.grad_reduce_bucket_size=4096", "trainer.gradient_clip_val=1.0")
    out["lamb"] = both("lamb", "model.optim.name=lamb", o2=False)
    variants = {"one_bucket": ["model.grad_reduce_bucket_size=0"], "no_overlap": ["model.optim.overlap_grad_sync=false"],
                "param_sync": ["model.optim.overlap_param_sync=true", "trainer.val_check_interval=100",
                               "trainer.limit_val_batches=1"]}
    for name, keys in variants.items():
        run = build_run(_experiment(d, corpus, plugins, name, DIST, "model.grad_reduce_bucket_size=4096", *keys, o2=True,
                                    devices=2), plugins)
        losses = _steps(run, 3)
        if name == "param_sync":  # the next forward gathers; validation and checkpoints gather first
            main = run.main_params
            stale_before = any(b.stale for b in main.buckets)
            out["param_sync_state"] = _model_space(run)  # gathers
            main.copy_to_model()  # stale again, as after a step
            validate(run)
            held = {k: v.clone() for k, v in run.model.state_dict().items()}  # what validation read
            rounded = {k: v.to(torch.bfloat16) for k, v in run.model_state_dict().items()}
            out["param_sync_reads"] = stale_before, all(torch.equal(rounded[k], v) for k, v in held.items())
            _steps(run, 1)
            assert any(b.stale for b in main.buckets)
            run.save_checkpoint()
            out["param_sync_saved"] = not any(b.stale for b in main.buckets)
        out[name] = losses, _model_space(run) if name != "param_sync" else out.pop("param_sync_state")
    for family in ("bert", "t5", "txl"):
        runs = []
        for on in ("false", "true"):
            raw = _family_raw(d, family)
            raw["exp_manager"]["name"] = f"{family}_{on}"
            cfg = config_from_dict(raw, [f"model.optim.use_distributed_optimizer={on}"], plugins)
            run = build_run(cfg, plugins)
            runs.append((_steps(run, 2), _model_space(run)))
        out[family] = runs
    for fmt in FORMATS:
        run = build_run(_ckpt_config(d, corpus, plugins, f"dp2_{fmt}", fmt, 2), plugins)
        out[f"dp2_{fmt}"] = _saved_at_2(run)
        if fmt == "native":
            out["dp2_counted"] = counted_state_bytes(run.model, run.optimizer, run.main_params)["total"]
            out["dp2_plan"] = estimate(run.config, run.model.vocab_size)["rank"]["state"]
        for source in ("dp4", "dp1"):
            out[f"{source}to2_{fmt}"] = _resumed(d, corpus, plugins, f"{source}to2_{fmt}", fmt, 2)
    return out


def _bucket_chunks(checkpoint: Path) -> dict:
    """DCP key -> the offsets of its chunks, for the distributed optimizer's bucket tensors."""
    import torch.distributed.checkpoint as dcp

    meta = dcp.FileSystemReader(str(checkpoint)).read_metadata().state_dict_metadata
    return {k: sorted(c.offsets[0] for c in m.chunks) for k, m in meta.items() if k.startswith("optimizer.distributed.")}


@pytest.mark.slow
def test_data_parallel_runs_equal_the_plain_optimizer_and_resume_at_any_size(tmp_path, corpus):
    """Two gloo launches (4 ranks, then 2) around runs in this process (one thread, as
    each worker):

    * against the plain optimizer at the same layout, no clipping: fp32 at DP=2 (DDP:
      pre-divided by 2, here divided after the sum; both exact) and O2 at DP=2 (buckets of
      4096, one bucket, no overlap, overlapped parameter all-gather) bit for bit in losses,
      weights and moments, grad norms within 1e-6 (another summation order), as at
      TP=2 x DP=2 and PP=2 x DP=2 (the tied embedding's own bucket lines up the embedding
      group's all-reduce; with the overlapped all-gather too, whose hooks never see the
      last stage's head, held by a module without a forward); BERT and T5 bit for bit; at DP=4 gloo sums 4 addends in an order
      that depends on where an element sits: losses within 1e-6, weights within 1e-6;
      LAMB (DP=2; and Transformer-XL's LAMB) within 1e-6, its trust ratio summed from
      shards; with clipping active (norm ~1.8 > 1) within 1e-6.
    * overlap_param_sync: the updated parameters wait for the next forward, validation
      and checkpoints gather them first.
    * checkpoints of each format saved at DP=1, 2 and 4: loading at another size copies
      the saved state exactly (weights and moments bit for bit), and the next loss is the
      uninterrupted run's within 1e-6 (it sums 1, 2 or 4 partial sums in another order),
      with or without the distributed optimizer in the resumed run; at TP=2 x DP=2 from
      DP=4 (resharded too) within 2e-5 (bf16 sums at TP=2 against TP=1; measured 9.2e-6).
    * torch_dist: every data-parallel rank wrote its own chunk of each bucket tensor.
    * the state each layout leaves, counted tensor by tensor, is `mega plan`'s."""
    from mega.plugin_manager import load_plugins
    from mega.testing import run_ranks

    d = tmp_path
    _write_family_files(d)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        plugins = load_plugins()
        dp1 = {}
        for fmt in FORMATS:
            run = build_run(_ckpt_config(d, corpus, plugins, f"dp1_{fmt}", fmt, 1), plugins)
            dp1[fmt] = _saved_at_2(run)
        dp1_counted = counted_state_bytes(run.model, run.optimizer, run.main_params)["total"]
        dp1_plan = estimate(run.config, run.model.vocab_size)["rank"]["state"]
        for fmt in FORMATS:
            _copy(d, f"dp1_{fmt}", f"dp1to4_{fmt}")
            _copy(d, f"dp1_{fmt}", f"dp1to2_{fmt}")
        four = run_ranks(_four_ranks, world=4, args=(d, corpus), timeout=500)
        for fmt in FORMATS:
            _copy(d, f"dp4_{fmt}", f"dp4to2_{fmt}")
            for on in ("true", "false"):
                _copy(d, f"dp4_{fmt}", f"dp4to1{on}_{fmt}")
        two = run_ranks(_two_ranks, world=2, args=(d, corpus), timeout=500)
        to1 = {}
        for fmt in FORMATS:
            for on in ("true", "false"):
                _copy(d, f"dp2_{fmt}", f"dp2to1{on}_{fmt}")
                for source in ("dp2", "dp4"):
                    name = f"{source}to1{on}_{fmt}"
                    to1[name] = _resumed(d, corpus, plugins, name, fmt, 1, f"model.optim.use_distributed_optimizer={on}")
    finally:
        torch.set_num_threads(threads)

    def rel(a, b, i):
        return max(abs(x[i] - y[i]) / abs(x[i]) for x, y in zip(a, b))

    report = []

    def same(pair, name, bitwise=True, tol=1e-6, moments=True):
        """`moments`: the distributed side's are whole (on data-parallel rank 0)."""
        (sa, (wa, ma)), (sb, (wb, mb)) = pair
        w, lr, nr = _max_diff(wa, wb), rel(sa, sb, 0), rel(sa, sb, 1)
        m = _moments_diff(ma, mb) if moments else 0.0
        report.append(f"{name}: losses {lr:.2g}, norms {nr:.2g}, weights {w:.2g}, moments {m:.2g}")
        if bitwise:
            assert lr == 0.0 and w == 0.0 and m == 0.0 and nr < 1e-6, report[-1]
        else:  # moments include the step counts: a parameter no step reached has none
            assert lr < tol and nr < tol and w < tol and m < tol, report[-1]

    r0, w0 = two[0], four[0]
    for name in ("fp32", "o2", "bert", "t5"):
        same(r0[name], f"DP=2 {name}")
    for name in ("one_bucket", "no_overlap", "param_sync"):
        same((r0["o2"][0], r0[name]), f"DP=2 O2 {name}")
    for name in ("lamb", "txl", "o2_clip"):
        same(r0[name], f"DP=2 {name}", bitwise=False)
    assert r0["param_sync_reads"] == (True, True) and r0["param_sync_saved"]
    same((w0["dp4_plain"], (w0["dp4_native"][0], w0["dp4_final"])), "DP=4 O2", bitwise=False)
    for rank in range(4):  # TP=2 x DP=2: ranks 0 and 1 are data-parallel rank 0; PP=2 x DP=2: ranks 0 and 2
        same((four[rank]["tp2_false"], four[rank]["tp2_true"]), f"TP=2xDP=2 rank {rank}", moments=rank < 2)
        same((four[rank]["pp2_false"], four[rank]["pp2_true"]), f"PP=2xDP=2 rank {rank}", moments=rank % 2 == 0)
        same((four[rank]["pp2_false"], four[rank]["pp2_param_sync"]), f"PP=2xDP=2 param_sync rank {rank}",
             moments=rank % 2 == 0)

    # checkpoints: what a resumed run holds is what was saved; its next loss the saving run's
    saved = {**{f"dp1_{f}": dp1[f] for f in FORMATS}, **{f"dp4_{f}": w0[f"dp4_{f}"] for f in FORMATS},
             **{f"dp2_{f}": r0[f"dp2_{f}"] for f in FORMATS}}
    resumed = {**{k: v for k, v in w0.items() if k.startswith("dp1to4")}, **{k: v for k, v in r0.items() if "to2_" in k},
               **to1}
    for name, ((wl, ml), loss) in resumed.items():
        source = name.split("to", 1)[0] + "_" + name.split("_", 1)[1]
        losses, (ws, ms) = saved[source]
        diff = abs(loss - losses[2][0]) / losses[2][0]
        report.append(f"{name}: weights {_max_diff(ws, wl):.2g}, moments {_moments_diff(ms, ml):.2g}, next loss {diff:.2g}")
        assert _max_diff(ws, wl) == 0.0 and _moments_diff(ms, ml) == 0.0 and diff < 1e-6, report[-1]
    for fmt in FORMATS:  # DP=4 -> TP=2 x DP=2: resharded weights and moments are the saved ones' slices
        ws, ms = saved[f"dp4_{fmt}"][1]
        for rank in (0, 1):  # data-parallel rank 0 of each tensor-parallel rank holds the whole state
            (wl, ml), loss = four[rank][f"dp4totp2_{fmt}"]
            tp = four[rank]["tp_rank"]
            for n, t in wl.items():
                dim = [i for i, (a, b) in enumerate(zip(t.shape, ws[n].shape)) if a != b]
                want = ws[n].chunk(2, dim[0])[tp] if dim else ws[n]
                assert torch.equal(t, want), (fmt, n)
                if n in ml:
                    assert all(torch.equal(ml[n][k], ms[n][k].chunk(2, dim[0])[tp] if dim and ms[n][k].dim() else ms[n][k])
                               for k in ml[n]), (fmt, n)
            diff = abs(loss - saved[f"dp4_{fmt}"][0][2][0]) / saved[f"dp4_{fmt}"][0][2][0]
            report.append(f"dp4totp2_{fmt}: next loss {diff:.2g}")
            assert diff < 2e-5, report[-1]  # bf16 at TP=2 against TP=1: measured 9.2e-6

    # torch_dist: each data-parallel rank wrote its shard of every bucket tensor
    for dp, name in ((2, "dp2_torch_dist"), (4, "dp4_torch_dist")):
        chunks = _bucket_chunks(_latest(d / "results" / name))
        assert chunks and all(len(offsets) == dp or offsets[0] == 0 for offsets in chunks.values())
        assert max(len(offsets) for offsets in chunks.values()) == dp
    # the fullest rank's state after a step, counted tensor by tensor, is the plan's
    counted = {1: dp1_counted, 2: max(r["dp2_counted"] for r in two), 4: max(f["dp4_counted"] for f in four)}
    planned = {1: dp1_plan, 2: r0["dp2_plan"], 4: w0["dp4_plan"]}
    report.append("state per rank (bytes): " + ", ".join(f"d={k}: {v} ({v / counted[1]:.3f})" for k, v in counted.items()))
    print("\n".join(report))
    assert counted == planned and counted[4] < counted[2] < counted[1]


def test_the_fit_check_of_mega_run_uses_the_sharded_figures(tmp_path, corpus, plugins, monkeypatch):
    """`mega run`'s refusal (mega.plan.check_fits) estimates with the distributed optimizer's
    figures: with free memory between the two peaks, the plain layout is refused and the
    sharded one accepted."""
    from mega import plan

    keys = ["trainer.devices=4", "model.num_layers=4", "model.hidden_size=256"]
    plain = _experiment(tmp_path, corpus, plugins, "fit", *keys, o2=True)
    sharded = _experiment(tmp_path, corpus, plugins, "fit", *keys, DIST, o2=True)
    vocab = plan.vocab_size_of(plain)[0]
    a, b = plan.estimate(plain, vocab)["rank"]["peak"], plan.estimate(sharded, vocab)["rank"]["peak"]
    assert b < a
    monkeypatch.setattr(plan, "available_memory", lambda device: 4 * (a + b) // 2)  # 4 local workers share the RAM
    with pytest.raises(ConfigError, match="the run needs about"):
        plan.check_fits(plain)
    assert plan.check_fits(sharded)["distributed_optimizer"]

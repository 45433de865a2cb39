"""The Llama family under tensor and pipeline parallelism, and in Megatron-LM's and
megatron-core's files: TP=2 equals one process (logits of an imported HF model, greedy
generation, training losses), PP=2 trains like one process (tied and untied, grouped-query
attention), `torch_dist` saved at TP=2 loads at TP=1 and PP=2, `mega export --to megatron`
at TP=2 x PP=2 imports back with the same logits, the distributed optimizer at TP=2 x DP=2
trains like one process, and a Qwen2 directory imports, trains at TP=2 x PP=2 (`mega run`),
generates and exports back to transformers. Ranks are gloo processes on the CPU
(mega.testing.run_ranks)."""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import pytest
import torch

from mega.checkpoint import restore
from mega.cli import main
from mega.errors import ConfigError
from tests.helpers import llama as fx
from mega.testing import run_ranks

transformers = pytest.importorskip("transformers")

GATE_UP = "language_model.encoder.layers.0.mlp.dense_h_to_4h.weight"


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    """A Llama (8 query heads in 2 groups, untied, llama3 RoPE scaling) imported from its
    HF directory with a Llama 2 sentencepiece tokenizer: (HF model, run directory)."""
    d = tmp_path_factory.mktemp("llama_tp")
    sp = fx.sentencepiece_llama(d / "sp")
    import sentencepiece as spm

    vocab = spm.SentencePieceProcessor(model_file=str(sp)).get_piece_size()
    hf_model = fx.hf_model("llama_gqa_llama3", vocab, initializer_range=0.15)  # wide: greedy decoding varies
    src = fx.save_directory(hf_model, d / "hf", "sentencepiece", sp)
    assert main(["import", str(src), str(d / "run"), "--option", "make_vocab_size_divisible_by=8"]) == 0
    return hf_model, d / "run"


def _tp_forward_and_generate(state, run_dir, ids, prompt, gate, up):
    """At this rank's layout: the gathered logits, 10 greedy tokens (KV cache of this rank's
    key/value heads), and whether this rank's fc1 is [gate_r; up_r]."""
    from mega.inference import generate

    model, _, _ = restore(run_dir)
    with torch.no_grad():
        logits = model(ids)[..., :model.vocab_size]
    r, tp = state.tp_rank, state.tp_size
    local = model.state_dict()[GATE_UP]
    mine = torch.equal(local, torch.cat([gate.chunk(tp)[r], up.chunk(tp)[r]]))
    cache = model.new_kv_cache(1, 4)
    return logits, generate(model, prompt, 10, greedy=True), mine, cache.keys[0].shape[1]


@pytest.mark.slow
def test_tp2_logits_and_generation_equal_transformers(imported):
    """T6, T8: at TP=2 each rank holds one of the 2 key/value groups and [gate_r; up_r];
    the logits equal HF's (and TP=1's), and greedy decoding equals `generate`."""
    hf_model, run_dir = imported
    model, tokenizer, _ = restore(run_dir)
    ids = fx.tokens(tokenizer.vocab_size)
    prompt = tokenizer.encode("the model reads a token and")
    with torch.no_grad():
        theirs = hf_model(ids).logits
        expected = hf_model.generate(torch.tensor([prompt]), max_new_tokens=10, do_sample=False, eos_token_id=None,
                                     pad_token_id=0)[0, len(prompt):].tolist()
    sd = hf_model.state_dict()
    gate, up = sd["model.layers.0.mlp.gate_proj.weight"], sd["model.layers.0.mlp.up_proj.weight"]
    one = _tp_forward_and_generate(type("S", (), {"tp_rank": 0, "tp_size": 1})(), run_dir, ids, prompt, gate, up)
    ranks = run_ranks(_tp_forward_and_generate, world=2, tp=2, args=(run_dir, ids, prompt, gate, up), timeout=240)
    for logits, generated, mine, cached_heads in ranks:
        diff = float((logits - theirs).abs().max())
        print(f"TP=2 max |dlogit| vs HF = {diff:.3g}, vs TP=1 = {float((logits - one[0]).abs().max()):.3g}")
        assert diff < 1e-5 and float((logits - one[0]).abs().max()) < 1e-5
        assert generated == expected == one[1] and len(set(generated)) > 3
        assert mine and cached_heads == 1  # 2 groups over 2 ranks
    assert one[3] == 2


# --- training: TP=2 and PP=2 equal one process ------------------------------------------------------


def _train(state, d, steps, model_keys):
    """Train a few steps of a `llama` through the real loop at this layout; (loss, grad
    norm) per step."""
    from mega.config import config_from_dict
    from mega.testing import write_corpus
    from mega.training.loop import train_step
    from mega.training.run import build_run
    from mega.training.run_dir import unlock_run_dir

    name = re.sub(r"[^\w.-]", "", f"w{state.world_size}tp{state.tp_size}pp{state.pp_size}_"
                  + "_".join(f"{k}{v}" for k, v in model_keys.items()))
    corpus = d / "c.txt"
    if state.rank == 0 and not corpus.exists():
        write_corpus(corpus)
    state.barrier()
    cfg = config_from_dict({
        "trainer": {"devices": state.world_size, "max_steps": steps, "val_check_interval": 0, "gradient_clip_val": 0.5,
                    "accelerator": "cpu"},
        "exp_manager": {"exp_dir": str(d), "name": name, "loggers": []},
        "model": {"name": "llama", "num_layers": 4, "hidden_size": 32, "num_attention_heads": 4, "num_query_groups": 2,
                  "ffn_hidden_size": 48, "seq_length": 16, "micro_batch_size": 2, "global_batch_size": 8,
                  "make_vocab_size_divisible_by": 130,  # 258 byte ids pad to 260 at TP=1 and TP=2
                  "tensor_model_parallel_size": state.tp_size, "pipeline_model_parallel_size": state.pp_size,
                  "tokenizer": {"library": "bytes"}, "data": {"data_prefix": [str(corpus)]}, **model_keys},
    })
    run = build_run(cfg)
    if model_keys.get("optim", {}).get("use_distributed_optimizer"):  # the switch reached the run
        assert type(run.optimizer).__name__ == "DistributedOptimizer" and state.dp_size == 2
    out = []
    try:
        for _ in range(steps):
            m = train_step(run)
            run.step += 1
            out.append((float(m["loss"]), float(m["grad_norm"])))
    finally:
        unlock_run_dir(run.run_dir)
    return out


def _assert_same(reference, layouts):
    for losses in layouts:
        assert len(losses) == len(reference)
        for (l0, g0), (l1, g1) in zip(reference, losses):
            assert l1 == pytest.approx(l0, rel=1e-5) and g1 == pytest.approx(g0, rel=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_pp2_and_tp2_train_like_one_process(tmp_path, tied):
    """T7: a Llama (RoPE, RMSNorm, SwiGLU, grouped-query attention) at PP=2 (the untied
    output layer on the last stage, no embedding gradient exchange) and at TP=2 gives one
    process's losses and clipped gradient norms over 3 steps. Tied: 4 query heads in 2
    groups; untied: 8 in 4, so each TP rank holds 2 whole groups (the imported model's TP=2
    test above holds 1 per rank; groups that do not divide TP are refused, below)."""
    from mega.runtime.parallel import current

    keys = {"share_embeddings_and_output_weights": tied}
    if not tied:
        keys.update(num_attention_heads=8, num_query_groups=4)
    reference = _train(current(), tmp_path, 3, keys)
    print(f"one process ({'tied' if tied else 'untied'}): {reference}")
    _assert_same(reference, run_ranks(_train, world=2, pp=2, args=(tmp_path, 3, keys), timeout=300))
    if not tied:
        _assert_same(reference, run_ranks(_train, world=2, tp=2, args=(tmp_path, 3, keys), timeout=300))


@pytest.mark.slow
def test_the_distributed_optimizer_at_tp2_dp2_trains_like_one_process(tmp_path):
    """megatron-core's distributed optimizer with the Llama options at TP=2 x DP=2: each
    data-parallel rank updates its slice of buckets that hold the per-half fc1 and the
    grouped QKV shards and the untied output layer; 3 steps give one process's losses and
    clipped gradient norms."""
    from mega.runtime.parallel import current

    keys = {"share_embeddings_and_output_weights": False, "num_attention_heads": 8, "num_query_groups": 4}
    reference = _train(current(), tmp_path, 3, keys)
    distributed = {**keys, "optim": {"use_distributed_optimizer": True}, "grad_reduce_bucket_size": 4096}
    _assert_same(reference, run_ranks(_train, world=4, tp=2, args=(tmp_path, 3, distributed), timeout=400))


def test_query_groups_that_do_not_divide_over_tp_are_refused(plugins):
    """§5.1: each rank holds whole key/value heads; MQA (1 group) at TP=2 is refused by name."""
    from mega.config import config_from_dict

    raw = {"name": "llama", "num_layers": 2, "hidden_size": 32, "num_attention_heads": 4, "num_query_groups": 1,
           "ffn_hidden_size": 48, "seq_length": 16, "tensor_model_parallel_size": 2, "tokenizer": {"library": "bytes"}}
    with pytest.raises(ConfigError, match="model.num_query_groups=1 is not divisible by model.tensor_model_parallel_size=2"):
        config_from_dict({"model": raw}, plugins=plugins).model.check()


# --- torch_dist at TP=2, read at TP=1 and PP=2 ---------------------------------------------------------


def _step_and_save(state, run_dir, out, ids):
    """At TP=2: the imported model, one AdamW step, saved as torch_dist; this rank's state."""
    from mega.checkpoint import optimizer_param_names
    from mega.plugins.checkpoints.torch_dist import TorchDistFormat
    from mega.runtime.sharding import optimizer_by_name, sharding_of
    from mega.training.run import param_groups

    from mega.config import to_dict

    model, _, config = restore(run_dir)
    model.train()
    opt = torch.optim.AdamW(param_groups(model, 0.1), lr=1e-2)
    model.training_loss({"tokens": ids, "labels": ids, "loss_mask": torch.ones_like(ids, dtype=torch.float)})[
        "loss_sum"].backward()
    opt.step()
    names = optimizer_param_names(model)
    sharding = sharding_of(model, state)
    Path(out).mkdir(exist_ok=True)
    TorchDistFormat().save({"model": model.state_dict(), "optimizer": opt.state_dict(), "param_names": names,
                            "trainer": {"step": 1}, "sharding": sharding, "config": to_dict(config)}, Path(out), state)
    return model.state_dict(), optimizer_by_name(opt.state_dict(), names), sharding


def _load(state, run_dir, out):
    """At this rank's layout: a model built afresh, loaded from the torch_dist files."""
    from mega.checkpoint import load_resharded, optimizer_param_names
    from mega.plugins.checkpoints.torch_dist import TorchDistFormat
    from mega.runtime.sharding import optimizer_by_name
    from mega.training.run import param_groups

    torch.manual_seed(99)
    model, _, _ = restore(run_dir)
    opt = torch.optim.AdamW(param_groups(model, 0.1), lr=1e-2)
    loaded = load_resharded(TorchDistFormat(), Path(out), {"tensor_model_parallel_size": 2,
                                                           "pipeline_model_parallel_size": 1}, state, model, opt)
    model.load_state_dict(loaded["model"])
    opt.load_state_dict(loaded["optimizer"])
    return model.pipeline_layer_offset, model.state_dict(), optimizer_by_name(opt.state_dict(), optimizer_param_names(model))


@pytest.mark.slow
def test_torch_dist_saved_at_tp2_loads_at_tp1_and_pp2(imported, tmp_path):
    """T9: the gated fc1 is written as megatron-core writes it (global [gate; up], each
    rank's halves at fragments r and TP + r), and read back at TP=1 and PP=2 with its
    AdamW moments; the untied output layer and the grouped QKV alike."""
    import torch.distributed.checkpoint as dcp

    from mega.runtime.parallel import current
    from mega.runtime.sharding import merge_shards

    hf_model, run_dir = imported
    ids = fx.tokens(300, length=16)
    out = tmp_path / "dist"
    ranks = run_ranks(_step_and_save, world=2, tp=2, args=(run_dir, str(out), ids), timeout=240)
    sharding = ranks[0][2]
    assert sharding["partition_chunks"] == {f"language_model.encoder.layers.{i}.mlp.dense_h_to_4h.weight": 2
                                            for i in range(2)}
    full = merge_shards([r[0] for r in ranks], sharding)
    moments = {name: merge_shards([{name: r[1][name]["exp_avg"]} for r in ranks],
                                  {**sharding, "partition_dims": {name: sharding["partition_dims"][name]}})[name]
               for name in ranks[0][1]}
    metadata = dcp.FileSystemReader(str(out)).read_metadata().state_dict_metadata
    fc1 = metadata["decoder.layers.mlp.linear_fc1.weight"]  # megatron-core's stacked layers: [layers, 2F, h]
    assert list(fc1.size) == [2, 192, 64]
    assert sorted(c.offsets[1] for c in fc1.chunks if c.offsets[0] == 0) == [0, 48, 96, 144]
    assert "output_layer.weight" in metadata and "decoder.layers.self_attention.linear_qkv.weight" in metadata
    reader = {"decoder.layers.mlp.linear_fc1.weight": torch.zeros(2, 192, 64)}
    dcp.load(reader, storage_reader=dcp.FileSystemReader(str(out)), no_dist=True)
    assert torch.equal(reader["decoder.layers.mlp.linear_fc1.weight"][0], full[GATE_UP])

    _, at_tp1, opt_tp1 = _load(current(), run_dir, str(out))
    for name, value in full.items():
        assert torch.equal(at_tp1[name], value), name
        assert torch.equal(opt_tp1[name]["exp_avg"], moments[name]), name
    stages = run_ranks(_load, world=2, pp=2, args=(run_dir, str(out)), timeout=240)
    for offset, state, opt_state in stages:
        for name, value in state.items():
            source = name.replace("layers.0.", f"layers.{offset}.")
            assert torch.equal(value, full[source]), (offset, name)
            assert torch.equal(opt_state[name]["exp_avg"], moments[source]), (offset, name)
    assert "word_embeddings_for_head.weight" not in stages[1][1]  # untied: no copy on the last stage


# --- Megatron-LM legacy files at TP=2 x PP=2 ------------------------------------------------------------


def test_megatron_export_at_tp2_pp2_imports_back_with_the_same_logits(imported, tmp_path, plugins):
    """T10: `mega export --to megatron` splits fc1 per half and the grouped QKV by groups,
    writes megatron-core's architecture `args`, and `mega import` (from the files alone,
    `args.mega_model` removed too) gives the same logits."""
    hf_model, run_dir = imported
    model, tokenizer, _ = restore(run_dir, plugins)
    ids = fx.tokens(tokenizer.vocab_size)
    out = tmp_path / "megatron"
    assert main(["export", str(run_dir), str(out), "--to", "megatron", "--option", "tensor_parallel=2",
                 "--option", "pipeline_parallel=2"]) == 0
    torch.serialization.add_safe_globals([argparse.Namespace])
    first = torch.load(out / "iter_0000000" / "mp_rank_01_000" / "model_optim_rng.pt", weights_only=True)
    last = torch.load(out / "iter_0000000" / "mp_rank_01_001" / "model_optim_rng.pt", weights_only=True)
    args = first["args"]
    assert (args.swiglu, args.normalization, args.position_embedding_type, args.group_query_attention,
            args.num_query_groups, args.untie_embeddings_and_output_weights, args.add_bias_linear) == (
        True, "RMSNorm", "rope", True, 2, True, False)
    assert (args.rotary_base, args.use_rope_scaling, args.rope_scaling_factor, args.tokenizer_type) == (
        500000, True, 8.0, "Llama2Tokenizer")
    sd = hf_model.state_dict()
    encoder = first["model"]["language_model"]["encoder"]
    assert "layers.0.input_norm.weight" in encoder and "layers.0.post_attention_norm.weight" in encoder  # Megatron's RMSNorm names
    assert "final_norm.weight" in last["model"]["language_model"]["encoder"]
    local_fc1 = encoder["layers.0.mlp.dense_h_to_4h.weight"]
    gate, up = sd["model.layers.0.mlp.gate_proj.weight"], sd["model.layers.0.mlp.up_proj.weight"]
    assert torch.equal(local_fc1, torch.cat([gate.chunk(2)[1], up.chunk(2)[1]]))  # rank 1's halves
    assert "output_layer" in last["model"]["language_model"] and "word_embeddings_for_head" not in last["model"]
    with torch.no_grad():
        expected = model(ids)[..., :tokenizer.vocab_size]
    for step, drop_name in ((0, False), (1, True)):
        if drop_name:  # a file that does not say its family: the Llama converter recognises the architecture
            for f in out.glob("iter_*/mp_rank_*/model_optim_rng.pt"):
                saved = torch.load(f, weights_only=True)
                del saved["args"].mega_model
                torch.save(saved, f)
        assert main(["import", str(out), str(tmp_path / f"back{step}")]) == 0
        back, tok, config = restore(tmp_path / f"back{step}", plugins)
        assert config.model.name == "llama" and tok.add_bos
        with torch.no_grad():
            assert float((back(ids)[..., :tokenizer.vocab_size] - expected).abs().max()) < 1e-5


def test_megatron_training_checkpoints_round_trip_and_resume_checks_the_rope(tmp_path, plugins):
    """The `megatron` training format with a llama: saved with Megatron-LM's RMSNorm names
    and megatron-core's args, loaded back tensor for tensor; resuming under another RoPE
    base (which the weights cannot show) is refused naming the key."""
    from mega.config import config_from_dict, to_dict
    from mega.errors import ConfigError
    from mega.plugins.checkpoints.megatron.format import MegatronFormat
    from mega.plugins.models.gpt_interop.megatron import check_resume
    from mega.runtime.parallel import ParallelState
    from mega.runtime.sharding import sharding_of

    raw = {"name": "llama", "num_layers": 2, "hidden_size": 32, "num_attention_heads": 4, "num_query_groups": 2,
           "ffn_hidden_size": 48, "seq_length": 16, "rotary_base": 500000.0, "tokenizer": {"library": "bytes"}}
    mc = config_from_dict({"model": raw}, plugins=plugins).model
    model = plugins.models.get("llama").factory(mc, plugins.tokenizers.get("bytes").factory(mc.tokenizer, [], None), plugins)
    state = {"model": model.state_dict(), "config": {"model": to_dict(mc)}, "sharding": sharding_of(model, ParallelState()),
             "vocab_size": 258, "trainer": {"step": 2}}
    MegatronFormat().save(state, tmp_path)
    torch.serialization.add_safe_globals([argparse.Namespace])
    saved = torch.load(tmp_path / "mp_rank_00" / "model_optim_rng.pt", weights_only=True)
    assert "final_norm.weight" in saved["model"]["language_model"]["encoder"]
    loaded = MegatronFormat().load(tmp_path)["model"]
    assert loaded.keys() == model.state_dict().keys()
    assert all(torch.equal(loaded[k], v) for k, v in model.state_dict().items())
    check_resume(saved["args"], mc, "ckpt")  # the same config: nothing to say
    other = config_from_dict({"model": {**raw, "rotary_base": 10000.0}}, plugins=plugins).model
    with pytest.raises(ConfigError, match="was trained with rotary_base=500000.0 but model.rotary_base=10000.0"):
        check_resume(saved["args"], other, "ckpt")


# --- done means: a directory imports, trains at TP x PP, generates and exports back ------------------------


@pytest.mark.slow
def test_a_qwen2_directory_imports_trains_at_tp2_pp2_generates_and_exports_back(tmp_path, plugins):
    """Issue 22's end to end: a Qwen2 directory (QKV-only bias, tied embeddings, a byte-level
    tokenizer.json) imported, trained 2 steps by `mega run` of the imported run at TP=2 x
    PP=2 (4 gloo ranks), exported; transformers' Qwen2ForCausalLM of the export gives the
    trained model's logits and the same greedy continuation as `mega.inference.generate`."""
    import os
    import subprocess
    import sys

    from mega.inference import generate
    from mega.testing import write_corpus
    from tokenizers import Tokenizer

    tok_json = fx.byte_level_json(tmp_path / "tok", "qwen2")
    vocab = Tokenizer.from_file(str(tok_json)).get_vocab_size(with_added_tokens=True)
    hf_model = fx.hf_model("qwen2_tied", vocab, initializer_range=0.15)  # wide: greedy decoding varies
    src = fx.save_directory(hf_model, tmp_path / "qwen2", "qwen2", tok_json)
    run_dir = tmp_path / "run"
    assert main(["import", str(src), str(run_dir), "--option", "seq_length=16"]) == 0
    imported = restore(run_dir, plugins).model.state_dict()
    corpus = write_corpus(tmp_path / "corpus.txt")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    env.pop("RANK", None)
    overrides = ["trainer.devices=4", "trainer.accelerator=cpu", "trainer.max_steps=2", "trainer.val_check_interval=0",
                 "model.tensor_model_parallel_size=2", "model.pipeline_model_parallel_size=2",
                 "model.micro_batch_size=2", "model.global_batch_size=4", "model.optim.lr=0.01",
                 f"model.data.data_prefix=[\"{corpus}\"]",
                 "exp_manager.resume_ignore_config_changes=true"]  # an import has no data: fine-tuning adds it
    proc = subprocess.run([sys.executable, "-m", "mega", "run", str(run_dir / "config.toml"), *overrides],
                          capture_output=True, text=True, timeout=400, cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (run_dir / "checkpoints" / "step_0000002").is_dir()
    model, tokenizer, config = restore(run_dir, plugins)
    assert config.model.name == "llama" and config.model.add_qkv_bias and not config.model.add_bias_linear
    assert (config.model.tensor_model_parallel_size, config.model.pipeline_model_parallel_size) == (2, 2)
    trained = model.state_dict()
    assert any(not torch.equal(trained[k], imported[k]) for k in imported)  # it trained

    out = tmp_path / "exported"
    assert main(["export", str(run_dir), str(out), "--to", "huggingface"]) == 0
    back = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    assert type(back).__name__ == "Qwen2ForCausalLM"
    ids = fx.tokens(vocab)
    diff = fx.max_logit_diff(model, back, ids, vocab)
    print(f"Qwen2 imported, trained at TP=2 x PP=2, exported: max |dlogit| vs transformers {diff:.3g}")
    assert diff < 1e-5
    prompt = tokenizer.encode("the model reads a token and")
    ours = generate(model, prompt, 8, greedy=True)
    with torch.no_grad():
        theirs = back.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False, eos_token_id=None,
                               pad_token_id=0)[0, len(prompt):].tolist()
    assert ours == theirs and len(set(ours)) > 3

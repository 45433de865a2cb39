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


# --- issue 8: args Megatron-LM and Hugging Face's converters read; loading their files -------


def _gpt(plugins, activation="gelu", seed=0, **extra):
    from mega.config import config_from_dict
    from mega.plugins.models.gpt import GPTModel

    cfg = config_from_dict({"model": {"num_layers": 2, "hidden_size": 32, "num_attention_heads": 4, "seq_length": 16,
                                      "make_vocab_size_divisible_by": 8, "hidden_dropout": 0.0, "attention_dropout": 0.0,
                                      "activation": activation, "tokenizer": {"library": "bytes"},
                                      **extra}}, plugins=plugins).model
    torch.manual_seed(seed)
    return cfg, GPTModel(cfg, 258).eval()


def test_args_carry_what_megatron_and_hf_read_on_every_rank(tmp_path, plugins):
    """Defect 1: every field from the config, the same on each pipeline stage (the last
    stage has no word embedding to measure)."""
    from mega.config import to_dict

    cfg, model = _gpt(plugins, "gelu_tanh", layernorm_epsilon=1e-6, ffn_hidden_size=96)
    config = {"model": to_dict(cfg)}
    last_stage = {k: v for k, v in model.state_dict().items() if "embedding" not in k}
    state = {"model": last_stage, "trainer": {"step": 3}, "config": config, "vocab_size": 258}
    MegatronFormat().save(state, tmp_path, ParallelState(tp_size=2, tp_rank=1, pp_size=2, pp_rank=1))
    torch.serialization.add_safe_globals([argparse.Namespace])
    args = torch.load(tmp_path / "mp_rank_01_001" / "model_optim_rng.pt", weights_only=True)["args"]
    assert (args.padded_vocab_size, args.orig_vocab_size, args.make_vocab_size_divisible_by) == (272, 258, 8)
    assert (args.bias_gelu_fusion, args.openai_gelu) == (False, True)
    assert (args.layernorm_epsilon, args.ffn_hidden_size, args.kv_channels) == (1e-6, 96, 8)
    assert args.add_position_embedding is True and args.position_embedding_type == "learned_absolute"
    assert (args.tokenizer_type, args.vocab_size, args.mega_tokenizer_library) == ("NullTokenizer", 257, "bytes")
    assert (args.tensor_model_parallel_size, args.pipeline_model_parallel_size) == (2, 2)
    cfg, model = _gpt(plugins, "gelu")
    MegatronFormat().save({"model": model.state_dict(), "config": {"model": to_dict(cfg)}, "vocab_size": 258}, tmp_path / "b")
    args = torch.load(tmp_path / "b" / "mp_rank_00" / "model_optim_rng.pt", weights_only=True)["args"]
    assert (args.bias_gelu_fusion, args.openai_gelu, args.ffn_hidden_size) == (False, False, 128)


def test_args_name_megatrons_sentencepiece_tokenizer(tmp_path):
    from mega.plugins.checkpoints.megatron.args import megatron_args

    args = megatron_args({"model": {"hidden_size": 32, "num_attention_heads": 4, "make_vocab_size_divisible_by": 8,
                                    "tokenizer": {"library": "sentencepiece", "model": "/x/sp.model"}}}, 1, 1, 500,
                         "/ckpt/tokenizer.sp.model")
    assert (args.tokenizer_type, args.tokenizer_model, args.mega_tokenizer_library) == (
        "GPTSentencePieceTokenizer", "/ckpt/tokenizer.sp.model", "sentencepiece")
    assert args.padded_vocab_size == 504


def _write(folder, payload):
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(payload, folder / "model_optim_rng.pt")


@pytest.mark.parametrize("field, value", [("squared_relu", True), ("position_embedding_type", "yarn"),
                                          ("normalization", "LayerNorm1p"), ("qk_layernorm", True),
                                          ("apply_layernorm_1p", True), ("num_experts", 8),
                                          ("apply_residual_connection_post_layernorm", True)])
def test_architectures_mega_cannot_run_are_refused_by_field(tmp_path, plugins, field, value):
    """Defect 2: never loaded silently wrong. (RoPE, RMSNorm, SwiGLU, grouped-query
    attention, bias-less linears and an untied output layer are GPT options now:
    tests/test_llama_parallel.py reads them.)"""
    from mega.errors import CheckpointError

    _, model = _gpt(plugins)
    args = argparse.Namespace(num_layers=2, hidden_size=32, num_attention_heads=4, tensor_model_parallel_size=1,
                              pipeline_model_parallel_size=1, **{field: value})
    _write(tmp_path / "mp_rank_00", {"args": args, "checkpoint_version": 3.0, "model": nest(model.state_dict())})
    with pytest.raises(CheckpointError, match=rf"args\.{field}={value!r}"):
        MegatronFormat().load(tmp_path)


def test_an_output_layer_args_say_is_tied_is_refused(tmp_path, plugins):
    from mega.errors import CheckpointError

    _, model = _gpt(plugins)
    state = dict(model.state_dict(), **{"language_model.output_layer.weight": torch.zeros(264, 32)})
    _write(tmp_path / "mp_rank_00", {"args": argparse.Namespace(num_layers=2, untie_embeddings_and_output_weights=False),
                                     "checkpoint_version": 3.0, "model": nest(state)})
    with pytest.raises(CheckpointError, match="output_layer but args.untie_embeddings_and_output_weights is false"):
        MegatronFormat().load(tmp_path)


def test_hf_converters_files_load_strictly(tmp_path, plugins):
    """Defect 3: Hugging Face's converter writes SimpleNamespace args, the tied head's copy
    even at PP=1, no iteration, and Megatron-LM (since Sep 2023) says `input_norm`."""
    import types

    _, model = _gpt(plugins)
    state = model.state_dict()
    nested = nest({k.replace("input_layernorm", "input_norm"): v for k, v in state.items()})
    nested["word_embeddings_for_head"] = {"weight": state["language_model.embedding.word_embeddings.weight"]}
    args = types.SimpleNamespace(num_layers=2, hidden_size=32, num_attention_heads=4, tensor_model_parallel_size=1,
                                 pipeline_model_parallel_size=1, params_dtype=torch.float32)
    _write(tmp_path / "release" / "mp_rank_00", {"args": args, "checkpoint_version": 3.0, "model": nested,
                                                 "optimizer": {"step": 0}})
    loaded = MegatronFormat().load(tmp_path / "release")
    _, fresh = _gpt(plugins, seed=5)
    fresh.load_state_dict(loaded["model"])  # strict
    tokens = torch.randint(0, 258, (2, 16))
    assert torch.equal(fresh(tokens), model(tokens))


def test_layout_comes_from_args_not_from_a_manifest(tmp_path, plugins):
    """A pipeline-parallel save read by one process finds `mp_rank_00_000`."""
    _, model = _gpt(plugins)
    first = {k: v for k, v in model.state_dict().items() if ".layers.1." not in k and "final_layernorm" not in k}
    args = argparse.Namespace(num_layers=2, hidden_size=32, num_attention_heads=4, tensor_model_parallel_size=1,
                              pipeline_model_parallel_size=2)
    _write(tmp_path / "mp_rank_00_000", {"args": args, "checkpoint_version": 3.0, "model": nest(first)})
    state = MegatronFormat().load(tmp_path)
    assert state["sharding"]["pp_size"] == 2 and set(state["model"]) == set(first)


def test_unsafe_pickles_are_named_and_need_an_explicit_opt_in(tmp_path, plugins):
    import datetime

    from mega.errors import CheckpointError
    from mega.plugins.checkpoints.megatron.files import load_file

    _, model = _gpt(plugins)
    payload = {"args": argparse.Namespace(num_layers=2, started=datetime.date(2020, 1, 1)),
               "checkpoint_version": 3.0, "model": nest(model.state_dict())}
    _write(tmp_path / "mp_rank_00", payload)
    with pytest.raises(CheckpointError, match=r"datetime\.date.*--option trust_pickle=true"):
        MegatronFormat().load(tmp_path)
    assert load_file(tmp_path / "mp_rank_00" / "model_optim_rng.pt", "x", trust_pickle=True)["args"].num_layers == 2


# --- review fixes: every value the config knows; old files' model_parallel_size ------------


def test_args_carry_the_training_values_the_config_knows():
    from mega.plugins.checkpoints.megatron.args import megatron_args

    config = {"trainer": {"precision": "bf16", "max_steps": 500, "gradient_clip_val": 0.5},
              "model": {"hidden_size": 32, "num_attention_heads": 4, "micro_batch_size": 2, "global_batch_size": 16,
                        "seed": 7, "native_amp_init_scale": 65536.0, "native_amp_growth_interval": 200, "hysteresis": 3,
                        "tokenizer": {"library": "bytes"},
                        "data": {"data_prefix": [0.3, "/d/a", 0.7, "/d/b"], "splits_string": "98,1,1"},
                        "optim": {"name": "adamw", "lr": 6e-4, "weight_decay": 0.1, "betas": [0.9, 0.95], "eps": 1e-8,
                                  "sched": {"name": "cosine", "warmup_steps": 10, "min_lr": 6e-5, "decay_steps": 400}}}}
    args = megatron_args(config, 1, 1, 258)
    assert (args.params_dtype, args.bf16, args.fp16) == (torch.bfloat16, True, False)
    assert (args.train_iters, args.clip_grad, args.lr, args.min_lr, args.weight_decay) == (500, 0.5, 6e-4, 6e-5, 0.1)
    assert (args.optimizer, args.adam_beta1, args.adam_beta2, args.adam_eps) == ("adam", 0.9, 0.95, 1e-8)
    assert (args.lr_warmup_iters, args.lr_decay_style, args.lr_decay_iters) == (10, "cosine", 400)
    assert (args.initial_loss_scale, args.loss_scale_window, args.hysteresis) == (65536.0, 200, 3)
    assert (args.split, args.data_path) == ("98,1,1", [0.3, "/d/a", 0.7, "/d/b"])
    assert (args.micro_batch_size, args.global_batch_size, args.seed) == (2, 16, 7)
    assert megatron_args({"model": {"hidden_size": 32, "num_attention_heads": 4}}, 1, 1, 258).params_dtype == torch.float32


def test_a_training_checkpoint_writes_the_run_config_values(tmp_path, corpus, plugins):
    cfg = tiny_config(tmp_path, corpus, plugins, trainer={"max_steps": 2, "val_check_interval": 0},
                      exp_manager={"checkpoint": {"format": "megatron"}})
    run = build_run(cfg, plugins)
    train(run)
    with torch.serialization.safe_globals([argparse.Namespace]):
        args = torch.load(run.run_dir / "checkpoints" / "iter_0000002" / "mp_rank_00" / "model_optim_rng.pt",
                          weights_only=True)["args"]
    assert (args.train_iters, args.lr, args.params_dtype) == (2, cfg.model.optim.lr, torch.float32)
    assert args.lr_warmup_iters == cfg.model.optim.sched.warmup_steps and args.seed == cfg.model.seed


@pytest.mark.parametrize("version", [1.0, 2.0])
def test_old_files_give_the_tp_size_as_model_parallel_size(tmp_path, plugins, version):
    """Megatron-LM before checkpoint_version 3.0 says `model_parallel_size`: its QKV rows
    are reordered per shard (heads / TP) and both ranks are read."""
    from mega.checkpoint import find_importer
    from mega.checkpoint import restore

    _, model = _gpt(plugins)
    state = model.state_dict()
    args = argparse.Namespace(num_layers=2, hidden_size=32, num_attention_heads=4, model_parallel_size=2,
                              max_position_embeddings=16, seq_length=16)
    for rank in range(2):
        shard = {}
        for k, v in state.items():
            from mega.plugins.checkpoints.megatron.layout import partition_dim

            dim = partition_dim(k)
            t = v if dim is None else v.chunk(2, dim=dim)[rank]
            shard[k] = _to_version(t, version, 2) if "query_key_value" in k and version < 2.0 else t
        _write(tmp_path / "meg" / "release" / f"mp_rank_{rank:02d}",
               {"args": args, "checkpoint_version": version, "iteration": 0, "model": nest(shard)})
    (tmp_path / "meg" / "latest_checkpointed_iteration.txt").write_text("release")
    find_importer(tmp_path / "meg", plugins).import_run(tmp_path / "meg", tmp_path / "run", {"tokenizer": "bytes"}, plugins)
    loaded, _, _ = restore(tmp_path / "run", plugins)
    tokens = torch.randint(0, 258, (2, 16))
    torch.testing.assert_close(loaded(tokens)[..., :258], model(tokens)[..., :258], rtol=0, atol=1e-6)
    single = MegatronFormat().load(tmp_path / "meg" / "release", ParallelState(tp_size=2, tp_rank=1))
    assert single["sharding"]["tp_size"] == 2


def test_training_checkpoints_name_the_kernels_copies_of_bpe_files(tmp_path):
    cfg = {"model": {"hidden_size": 32, "num_attention_heads": 4, "num_layers": 2,
                     "tokenizer": {"library": "huggingface", "vocab_file": "/x/vocab.json", "merges_file": "/x/merges.txt",
                                   "eos_token": "<|endoftext|>"}}}
    MegatronFormat().save({"model": {}, "config": cfg, "vocab_size": 300}, tmp_path / ".tmp-iter_0000001")
    with torch.serialization.safe_globals([argparse.Namespace]):
        args = torch.load(tmp_path / ".tmp-iter_0000001" / "mp_rank_00" / "model_optim_rng.pt", weights_only=True)["args"]
    final = tmp_path / "iter_0000001"
    assert (args.tokenizer_type, args.vocab_file, args.merge_file) == (
        "GPT2BPETokenizer", str(final / "tokenizer.vocab.json"), str(final / "tokenizer.merges.txt"))
    assert args.mega_tokenizer == {"eos_token": "<|endoftext|>"}


def test_resuming_with_another_activation_is_refused(tmp_path, corpus, plugins):
    """The weights fit either GELU; the checkpoint's args say which one it was trained with."""
    from mega.errors import ConfigError

    fmt = {"exp_manager": {"checkpoint": {"format": "megatron"}}}
    run = build_run(tiny_config(tmp_path, corpus, plugins, ["model.activation=gelu"],
                                trainer={"max_steps": 2, "val_check_interval": 0}, **fmt), plugins)
    train(run)
    # The run directory's config comparison refuses this first; forced past it, the
    # checkpoint's own args still do (as for Megatron files that came without a mega config).
    with pytest.raises(ConfigError, match=r"model.activation: 'gelu' -> 'gelu_tanh'"):
        build_run(tiny_config(tmp_path, corpus, plugins, ["trainer.max_steps=3", "model.activation=gelu_tanh"],
                              trainer={"val_check_interval": 0}, **fmt), plugins)
    forced = {**fmt, "exp_manager": {**fmt["exp_manager"], "resume_ignore_config_changes": True}}
    again = build_run(tiny_config(tmp_path, corpus, plugins, ["trainer.max_steps=3", "model.activation=gelu_tanh"],
                                  trainer={"val_check_interval": 0}, **forced), plugins)
    assert again.step == 2
    with pytest.raises(ConfigError, match=r"activation 'gelu' .* model.activation='gelu_tanh'"):
        train(again)
    same = build_run(tiny_config(tmp_path, corpus, plugins, ["trainer.max_steps=3", "model.activation=gelu"],
                                 trainer={"val_check_interval": 0}, **forced), plugins)  # config.toml now says gelu_tanh
    train(same)
    assert same.step == 3

"""megatron-core's own code as the judge (the optional `mcore` test extra; skipped where
`megatron-core` is not installed): its `GPTModel` (local layer spec, on the CPU) built
with mega's GPT-2-shaped defaults, with the Llama options, and with the options no HF class
holds (interleaved RoPE on half the head dims, wider heads, QKV-only bias, 2 groups per rank
at TP=2) computes mega's logits,
losses and gradients at TP=1 and TP=2; its default `dist_checkpointing.load` reads the
`torch_dist` files mega writes; `mega import` reads the `torch_dist` files it writes.

megatron-core runs on the CPU with `use_cpu_initialization=True`, its CUDA RNG tracker
seeded with `inference_rng_tracker=True`, an explicit causal mask (its default mask is
built on CUDA), and two test-only stand-ins: `torch.cuda.current_device` (RoPE moves its
frequencies there) and `torch.cuda.synchronize` (its checkpoint writer calls it). Each
layout is one launch of gloo ranks (mega.testing.run_ranks) that builds both models from the
same weights."""
from __future__ import annotations

import argparse
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

import pytest
import torch

# megatron-core is imported in the ranks' processes only: importing it here would add its
# classes (pathlib paths, its enums) to torch's weights_only allow-list for every later
# test of this process.
for _package, _why in (("megatron-core", "megatron-core is the optional `mcore` test extra"),
                       ("psutil", "megatron-core's checkpoint writer needs psutil")):
    try:
        distribution(_package)
    except PackageNotFoundError:
        pytest.skip(_why, allow_module_level=True)

from mega.checkpoint import restore  # noqa: E402
from mega.cli import main  # noqa: E402
from tests.helpers import llama as fx  # noqa: E402
from mega.testing import run_ranks  # noqa: E402

pytestmark = pytest.mark.slow
SEQ, BATCH = 16, 2
SHAPES = {"num_layers": 2, "hidden_size": 64, "num_attention_heads": 8, "ffn_hidden_size": 96, "seq_length": SEQ}
FAMILIES = {  # mega's model table -> megatron-core's TransformerConfig / GPTModel arguments
    "gpt": {"mega": {"name": "gpt", "hidden_dropout": 0.0, "attention_dropout": 0.0},
            "config": {"normalization": "LayerNorm"}, "model": {"position_embedding_type": "learned_absolute",
                                                                 "share_embeddings_and_output_weights": True}},
    "llama": {"mega": {"name": "llama", "num_query_groups": 2, "rotary_base": 500000.0, "rope_scaling": True},
              "config": {"normalization": "RMSNorm", "gated_linear_unit": True, "add_bias_linear": False,
                         "num_query_groups": 2},
              "model": {"position_embedding_type": "rope", "rotary_base": 500000, "rope_scaling": True,
                        "share_embeddings_and_output_weights": False}},
    # what HF's classes cannot hold, megatron-core judges: interleaved (Meta's) RoPE on half of
    # each head's dims, heads wider than hidden/heads, Qwen2's bias on QKV only, and 4 groups
    # (2 per rank at TP=2)
    "rope_variants": {"mega": {"name": "llama", "num_query_groups": 4, "kv_channels": 16, "rotary_interleaved": True,
                               "rotary_percent": 0.5, "add_qkv_bias": True},
                      "config": {"normalization": "RMSNorm", "gated_linear_unit": True, "add_bias_linear": False,
                                 "add_qkv_bias": True, "num_query_groups": 4, "kv_channels": 16,
                                 "rotary_interleaved": True},
                      "model": {"position_embedding_type": "rope", "rotary_percent": 0.5,
                                "share_embeddings_and_output_weights": False}},
}


def _cpu_megatron_core(tp: int):
    """megatron-core's parallel state on this process's gloo group, on the CPU."""
    torch.cuda.current_device = lambda: "cpu"  # test-only stand-ins (module docstring)
    torch.cuda.synchronize = lambda *args, **kwargs: None
    from megatron.core import parallel_state, tensor_parallel

    parallel_state.initialize_model_parallel(tp, 1)
    tensor_parallel.model_parallel_cuda_manual_seed(123, inference_rng_tracker=True)


def _mcore_model(family: str, tp: int, vocab: int):
    import torch.nn.functional as F
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_config import TransformerConfig

    spec = FAMILIES[family]
    config = TransformerConfig(
        num_layers=2, hidden_size=64, num_attention_heads=8, ffn_hidden_size=96, tensor_model_parallel_size=tp,
        layernorm_epsilon=1e-5, activation_func=F.silu if spec["config"].get("gated_linear_unit") else F.gelu, use_cpu_initialization=True,
        bias_activation_fusion=False, bias_dropout_fusion=False, masked_softmax_fusion=False, persist_layer_norm=False,
        apply_rope_fusion=False, gradient_accumulation_fusion=False, hidden_dropout=0.0, attention_dropout=0.0,
        **spec["config"])
    return GPTModel(config, get_gpt_layer_local_spec(normalization=spec["config"]["normalization"]), vocab_size=vocab,
                    max_sequence_length=SEQ, parallel_output=True, **spec["model"])


def _local_spec_name(mega_name: str) -> str:
    """mega's name -> megatron-core's module name in its local layer spec (the TE spec's
    fused layer norms are separate modules there)."""
    from mega.plugins.models.gpt_interop.mcore import mcore_name

    return mcore_name(mega_name).replace("self_attention.linear_qkv.layer_norm_", "input_layernorm.").replace(
        "mlp.linear_fc1.layer_norm_", "pre_mlp_layernorm.")


def _judge(state, directory: str, sp_model: str):
    """At this layout, for GPT's defaults and the Llama options: mega's and megatron-core's
    logits, losses, gradients; megatron-core's default loader on mega's torch_dist files;
    megatron-core's own torch_dist save (with Megatron-LM's args) for `mega import`."""
    import warnings

    warnings.filterwarnings("ignore")
    from megatron.core import dist_checkpointing

    from mega.config import config_from_dict, to_dict
    from mega.plugins.checkpoints.torch_dist import TorchDistFormat
    from mega.plugins.models.gpt import GPTModel
    from mega.runtime.parallel import current
    from mega.runtime.sharding import sharding_of
    from mega.runtime.tensor_parallel import gather_from_tp

    tp = state.tp_size
    _cpu_megatron_core(tp)
    vocab = 400  # the sentencepiece model's; padded to 512 (x TP) by Megatron's rule
    out = {}
    for family, spec in FAMILIES.items():
        raw = {**SHAPES, **spec["mega"], "tensor_model_parallel_size": tp, "mask_padded_vocab": False,
               "tokenizer": {"library": "sentencepiece", "model": sp_model}}
        mc = config_from_dict({"model": raw}).model
        torch.manual_seed(0)
        ours = GPTModel(mc, vocab)
        with torch.no_grad():  # norms and biases away from 1 and 0, so a swapped one shows
            g = torch.Generator().manual_seed(5)
            for p in ours.parameters():
                if p.dim() == 1:
                    p.add_(torch.randn(p.shape, generator=g) * 0.1)
        padded = ours.padded_vocab_size
        theirs = _mcore_model(family, tp, padded)
        missing, unexpected = theirs.load_state_dict({_local_spec_name(k): v for k, v in ours.state_dict().items()},
                                                     strict=False)
        assert not unexpected and all(k.endswith("_extra_state") for k in missing), (missing, unexpected)
        ids = torch.randint(0, vocab, (BATCH, SEQ), generator=torch.Generator().manual_seed(1))
        labels = torch.randint(0, vocab, (BATCH, SEQ), generator=torch.Generator().manual_seed(2))
        mask = torch.triu(torch.ones(SEQ, SEQ), 1).bool()[None, None]
        positions = torch.arange(SEQ)[None].expand(BATCH, SEQ)
        mega_logits = ours(ids, parallel_output=True)  # this rank's vocabulary slice, [b, s, V/tp]
        mcore_logits = theirs(ids, positions, mask)  # megatron-core returns [b, s, V/tp] from forward
        seq_first = mcore_logits.transpose(0, 1).contiguous()  # its output layer's [s, b, V/tp]
        mega_loss = ours.compute_language_model_loss(labels, mega_logits.transpose(0, 1))
        with torch.no_grad():  # mega's loss on megatron-core's own [s, b, V] logits (its loss works in place: a copy)
            on_theirs = ours.compute_language_model_loss(labels, seq_first.detach().clone())
        mcore_loss = theirs.compute_language_model_loss(labels, seq_first)
        mega_loss.sum().backward()
        mcore_loss.sum().backward()
        grads = dict(theirs.named_parameters())
        grad_diff = max(float((p.grad - grads[_local_spec_name(n)].grad).abs().max()) for n, p in ours.named_parameters())
        with torch.no_grad():
            full = gather_from_tp(mega_logits.detach())
        out[family] = {"logits": float((mega_logits - mcore_logits).abs().max()),
                       "loss": float((mega_loss - mcore_loss).abs().max()), "grads": grad_diff,
                       "same_loss_on_their_logits": float((on_theirs - mcore_loss).abs().max())}

        # mega writes torch_dist; megatron-core reads it at its defaults
        mine = Path(directory) / f"{family}_mega_tp{tp}"
        mine.mkdir(exist_ok=True)
        TorchDistFormat().save({"model": ours.state_dict(), "sharding": sharding_of(ours, current()),
                                "trainer": {"step": 0}, "config": {"model": to_dict(mc)}}, mine,
                               current() if tp > 1 else None)
        torch.manual_seed(7)
        fresh = _mcore_model(family, tp, padded)
        loaded = dist_checkpointing.load(fresh.sharded_state_dict(), str(mine))
        keys = set(fresh.state_dict())
        fresh.load_state_dict({k: v for k, v in loaded.items() if k in keys})
        with torch.no_grad():
            out[family]["mcore_reads_mega"] = float((fresh(ids, positions, mask) - mega_logits).abs().max())

        # megatron-core writes torch_dist as Megatron-LM does (args in common.pt); `mega import` reads it
        theirs_dir = Path(directory) / f"{family}_mcore_tp{tp}"
        theirs_dir.mkdir(exist_ok=True)
        dist_checkpointing.save({"model": theirs.sharded_state_dict(), "args": _megatron_args(family, tp, sp_model),
                                 "iteration": 3, "checkpoint_version": 3.0}, str(theirs_dir))
        out[family]["full_logits"] = full[..., :vocab]
    return out


def _megatron_args(family: str, tp: int, sp_model: str) -> argparse.Namespace:
    """The architecture, tokenizer and layout fields Megatron-LM's `args` hold for these
    models, spelled as its argument parser leaves them."""
    spec = FAMILIES[family]
    config, model = spec["config"], spec["model"]
    llama = config.get("gated_linear_unit", False)
    groups = config.get("num_query_groups")
    return argparse.Namespace(
        num_layers=2, hidden_size=64, num_attention_heads=8, ffn_hidden_size=96, kv_channels=config.get("kv_channels", 8),
        group_query_attention=groups is not None, num_query_groups=groups or 1, max_position_embeddings=SEQ,
        seq_length=SEQ, position_embedding_type=model["position_embedding_type"], rotary_base=model.get("rotary_base", 10000),
        rotary_percent=model.get("rotary_percent", 1.0), rotary_interleaved=config.get("rotary_interleaved", False),
        use_rope_scaling=model.get("rope_scaling", False), rope_scaling_factor=8.0,
        normalization=config["normalization"], norm_epsilon=1e-5, swiglu=llama,
        add_bias_linear=config.get("add_bias_linear", True),
        add_qkv_bias=config.get("add_bias_linear", True) or config.get("add_qkv_bias", False),
        untie_embeddings_and_output_weights=not model["share_embeddings_and_output_weights"], openai_gelu=False,
        bias_gelu_fusion=False, hidden_dropout=0.0, attention_dropout=0.0,
        tokenizer_type="Llama2Tokenizer" if llama else "GPTSentencePieceTokenizer", tokenizer_model=sp_model,
        padded_vocab_size=512, make_vocab_size_divisible_by=128, tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=1, iteration=3)


@pytest.fixture(scope="module")
def judged(tmp_path_factory):
    d = tmp_path_factory.mktemp("mcore")
    sp = fx.sentencepiece_llama(d / "sp")
    results = {tp: run_ranks(_judge, world=tp, tp=tp, args=(str(d), str(sp)), timeout=600) for tp in (1, 2)}
    return d, results


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("tp", [1, 2])
def test_mega_computes_what_megatron_cores_gpt_model_computes(judged, family, tp):
    """Logits, megatron-core's `compute_language_model_loss` on its own [s, b, V] logits,
    and every parameter's gradient, at TP=1 and TP=2 (each rank its own shards)."""
    for rank, figures in enumerate(judged[1][tp]):
        f = figures[family]
        print(f"{family} TP={tp} rank {rank}: logits {f['logits']:.3g}, loss {f['loss']:.3g}, grads {f['grads']:.3g}")
        assert f["logits"] < 1e-5 and f["loss"] < 1e-5 and f["grads"] < 1e-5
        assert f["same_loss_on_their_logits"] < 1e-5  # mega's loss takes megatron-core's layout


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("tp", [1, 2])
def test_megatron_cores_default_loader_reads_megas_torch_dist(judged, family, tp):
    """`dist_checkpointing.load(model.sharded_state_dict(), dir)` at its default strictness:
    the stacked `decoder.layers.*` tensors and every `_extra_state` it asks for are there."""
    for figures in judged[1][tp]:
        print(f"{family} TP={tp}: megatron-core's logits after loading mega's files {figures[family]['mcore_reads_mega']:.3g}")
        assert figures[family]["mcore_reads_mega"] < 1e-5


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("tp", [1, 2])
def test_mega_import_reads_megatron_cores_torch_dist(judged, tmp_path, plugins, family, tp):
    """`mega import` of megatron-core's own save (Megatron-LM's args, at TP=1 and TP=2):
    the family from the args and tensors, the logits of the model it saved."""
    d, results = judged
    assert main(["import", str(d / f"{family}_mcore_tp{tp}"), str(tmp_path / "run")]) == 0
    model, tokenizer, config = restore(tmp_path / "run", plugins)
    assert config.model.name == FAMILIES[family]["mega"]["name"]
    ids = torch.randint(0, 400, (BATCH, SEQ), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        diff = float((model(ids)[..., :400] - results[tp][0][family]["full_logits"]).abs().max())
    print(f"{family} TP={tp}: mega import of megatron-core's torch_dist, max |dlogit| {diff:.3g}")
    assert diff < 1e-5

"""`mega plan` and the memory check of `mega run`: parameter counts equal the built
models', the state a training step leaves behind (weights, gradients, optimizer) equals the
tensors counted after a real step in every precision layout (fp32, bf16/fp16 autocast,
model.megatron_amp_O2), autocast's 16-bit weight copies equal the casts a real forward
makes, the estimated peak of a training step is within 15% of the peak measured on CPU
(and on a GPU where there is one), a run that cannot fit is refused before anything is
allocated, and `--devices N` lists the layouts.

Activation memory per recomputation mode: the activation bytes equal the tensors a real
forward keeps (counted by mega.runtime.tensor_bytes) in fp32, bf16 autocast and O2, per
layer exactly; the formula reproduces Table 2 of Korthikanti et al. (with and without
sequence parallelism); the measured CPU peak of each mode is within 15% of the plan and
falls from none to selective to full; the refusal of `mega run` and the plan's option rows
use them. (Sequence parallelism's counts are checked at TP=2 in
tests/parallel/test_sequence_parallel.py.)"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mega.cli import main
from mega.config import config_from_dict
from mega.errors import ConfigError
from mega.plan import counted_state_bytes, estimate
from mega.plugins.models.bert import TASKS, BertConfig, BertModel
from mega.plugins.models.encoder_decoder import EncoderDecoderModel, StackConfig, T5Config
from mega.plugins.models.gpt import GPTConfig, GPTModel
from mega.testing import tiny_config, tiny_raw
from mega.training.loop import train_step
from mega.training.run import build_run

ROOT = Path(__file__).resolve().parents[2]

# (micro-batch, vocabulary, model keys): weights-dominated, attention-dominated (CPU's math
# SDPA path keeps b x heads x s x s probabilities with attention dropout), and the flash path.
SHAPES = [
    (2, 8000, dict(seq_length=64, num_layers=4, hidden_size=512, num_attention_heads=8)),
    (2, 1000, dict(seq_length=1024, num_layers=2, hidden_size=128, num_attention_heads=4)),
    (4, 4000, dict(seq_length=256, num_layers=2, hidden_size=256, num_attention_heads=4, attention_dropout=0.0)),
]

# One process measures every shape: a warm-up step first (code pages of torch's kernels
# are not the run's memory), then per shape the high-water mark is reset (clear_refs 5)
# and read after two full steps (the second has optimizer state). A fixed mmap threshold
# makes freed tensors go back to the OS, so one shape's memory does not hide the next's.
PROBE = r"""
import gc, json, sys, torch
from mega.plugins.models.gpt import GPTConfig, GPTModel
from mega.plugins.optim.adamw import AdamWConfig, build_adamw
from mega.training.run import param_groups
torch.set_num_threads(1)
device = sys.argv[1]
def vm(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
def peak(b, vocab, keys, measure):
    cfg = GPTConfig(**keys)
    tok = torch.randint(0, vocab, (b, cfg.seq_length), device=device)
    batch = {"tokens": tok, "labels": tok, "loss_mask": torch.ones(b, cfg.seq_length, device=device)}
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache(); torch.cuda.reset_peak_memory_stats(); base = torch.cuda.memory_allocated()
    else:
        open("/proc/self/clear_refs", "w").write("5"); base = vm("VmRSS")
    model = GPTModel(cfg, vocab).to(device).train()
    opt = build_adamw(AdamWConfig(), param_groups(model, 0.01))
    for _ in range(2):
        opt.zero_grad(set_to_none=True)
        loss = model.training_loss(batch)["loss_sum"] / (b * cfg.seq_length)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(model.parameters()), 1.0)
        opt.step()
    out = (torch.cuda.max_memory_allocated() if device == "cuda" else vm("VmHWM")) - base
    del model, opt, loss
    gc.collect()
    return out
peak(1, 100, dict(seq_length=16, num_layers=1, hidden_size=32, num_attention_heads=2), False)
peak(1, 100, dict(seq_length=16, num_layers=1, hidden_size=32, num_attention_heads=2, attention_dropout=0.0), False)
print(json.dumps([peak(b, v, k, True) for b, v, k in json.loads(sys.argv[2])]))
"""


def _measured(device: str, shapes=SHAPES) -> list:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    proc = subprocess.run([sys.executable, "-c", PROBE, device, json.dumps(shapes)], capture_output=True, text=True,
                          timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _estimated(b: int, vocab: int, keys: dict, device: str) -> int:
    raw = {"trainer": {"precision": 32}, "model": dict(keys, name="gpt", micro_batch_size=b, global_batch_size=b)}
    return estimate(config_from_dict(raw), vocab, device=device)["rank"]["peak"]


def _compare(device: str, shapes=SHAPES) -> list:
    rows = []
    for (b, vocab, keys), got in zip(shapes, _measured(device, shapes)):
        want = _estimated(b, vocab, keys, device)
        rows.append((keys, want / 2**20, got / 2**20, want / got - 1))
    report = "\n".join(f"{k}: estimate {w:.1f} MiB, measured {g:.1f} MiB ({r:+.1%})" for k, w, g, r in rows)
    print(report)
    assert all(abs(r) <= 0.15 for *_, r in rows), report
    return rows


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux's /proc peak-RSS reset")
def test_estimate_within_15_percent_of_measured_peak_on_cpu():
    _compare("cpu")


@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_estimate_within_15_percent_of_measured_peak_on_cuda():
    _compare("cuda")


@pytest.mark.parametrize("keys", [dict(num_layers=2, hidden_size=64, num_attention_heads=4, seq_length=32),
                                  dict(num_layers=3, hidden_size=96, num_attention_heads=3, seq_length=16,
                                       ffn_hidden_size=200, max_position_embeddings=40, make_vocab_size_divisible_by=64)])
def test_gpt_parameter_count_is_the_built_models(keys):
    cfg = GPTConfig(**keys)
    est = cfg.memory_per_rank(1000, 2, 1, 1, "32", "cpu")
    n = sum(p.numel() for p in GPTModel(cfg, 1000).parameters())
    assert est["params"] == est["stages"][0]["params"] == n


LLAMA = dict(position_embedding_type="rope", normalization="RMSNorm", activation="swiglu", add_bias_linear=False,
             share_embeddings_and_output_weights=False, hidden_dropout=0.0, attention_dropout=0.0)


@pytest.mark.parametrize("keys", [
    dict(LLAMA, num_layers=2, hidden_size=64, num_attention_heads=8, num_query_groups=2, ffn_hidden_size=96, seq_length=32),
    dict(LLAMA, num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2, kv_channels=24,
         seq_length=32, add_qkv_bias=True, share_embeddings_and_output_weights=True),  # Qwen2-style bias, own head dim, tied
    dict(LLAMA, num_layers=4, hidden_size=64, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=96,
         seq_length=32, add_bias_linear=True, normalization="LayerNorm"),
])
@pytest.mark.parametrize("tp,pp", [(1, 1), (2, 1), (1, 2), (2, 2)])
def test_llama_options_count_the_built_models_parameters(keys, tp, pp):
    """T14: the plan's parameters of every (TP rank 0, pipeline stage) equal the model
    built there (grouped QKV, gated fc1, RMSNorm, biases, untied head, no position table)."""
    from mega.runtime.parallel import ParallelState, current, set_current

    cfg = GPTConfig(**keys, tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    est = cfg.memory_per_rank(1000, 2, tp, pp, "32", "cpu")
    before = current()
    try:
        for stage in range(pp):
            set_current(ParallelState(tp_size=tp, pp_size=pp, pp_rank=stage, world_size=tp * pp))
            built = sum(p.numel() for p in GPTModel(cfg, 1000).parameters())
            assert est["stages"][stage]["params"] == built, (stage, est["stages"][stage]["params"], built)
    finally:
        set_current(before)
    set_current(ParallelState())
    try:
        assert est["params"] == sum(p.numel() for p in GPTModel(GPTConfig(**keys), 1000).parameters())
    finally:
        set_current(before)


# §4.7 presets: (transformers class, config fields, mega keys, the matmul parameters N of the
# spec's §9.1 table at its sequence length)
PRESETS = {
    "Llama-2-7B": ("Llama", dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                                 num_key_value_heads=32, vocab_size=32000), 4096, 6_607_077_376),
    "Llama-3-8B": ("Llama", dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                                 num_key_value_heads=8, vocab_size=128256), 8192, 7_504_658_432),
    "Llama-3.2-1B": ("Llama", dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                                   num_key_value_heads=8, head_dim=64, vocab_size=128256, tie_word_embeddings=True),
                     8192, 1_235_746_816),
    "Mistral-7B": ("Mistral", dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                                   num_key_value_heads=8, vocab_size=32000), 4096, 7_110_393_856),
    "Qwen2-7B": ("Qwen2", dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                               num_key_value_heads=4, vocab_size=152064), 4096, 7_070_285_824),
    "Qwen2-0.5B": ("Qwen2", dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                                 num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True), 4096, None),
}


@pytest.mark.parametrize("name", list(PRESETS))
def test_llama_presets_count_what_transformers_builds_and_the_flops_of_the_spec(name):
    """The plan's parameters of the §4.7 presets equal transformers' own count (built on
    the meta device: nothing allocated), and the training FLOPs per token are
    6 N + 12 L nh hd s with N the spec's matmul parameters (§9.1)."""
    transformers = pytest.importorskip("transformers")
    from mega.plugins.models.llama.huggingface import model_table

    family, fields, seq, matmul = PRESETS[name]
    config = getattr(transformers, f"{family}Config")(**fields)
    with torch.device("meta"):
        theirs = sum(p.numel() for p in getattr(transformers, f"{family}ForCausalLM")(config).parameters())
    table = model_table(json.loads(config.to_json_string()), name)
    table = {k: v for k, v in table.items() if k != "name"}
    cfg = GPTConfig(**{**table, "seq_length": seq, "max_position_embeddings": max(seq, table["max_position_embeddings"])})
    est = cfg.memory_per_rank(fields["vocab_size"], 1, 1, 1, "bf16", "cuda")
    assert est["params"] == theirs
    if matmul is not None:
        h, L, heads = fields["hidden_size"], fields["num_hidden_layers"], fields["num_attention_heads"]
        hd = fields.get("head_dim", h // heads)
        assert est["flops_per_token"] == 6 * matmul + 12 * L * heads * hd * seq


def test_gpt_splits_over_tensor_and_pipeline_ranks():
    cfg = GPTConfig(num_layers=4, hidden_size=64, num_attention_heads=4, seq_length=32)
    whole = cfg.memory_per_rank(1000, 2, 1, 1, "32", "cpu")["stages"][0]
    tp2 = cfg.memory_per_rank(1000, 2, 2, 1, "32", "cpu")["stages"][0]
    pp2 = cfg.memory_per_rank(1000, 2, 1, 2, "32", "cpu")["stages"]
    assert whole["params"] / 2 < tp2["params"] < whole["params"]
    assert tp2["activations"] < whole["activations"]
    assert len(pp2) == 2 and all(s["params"] < whole["params"] for s in pp2)
    assert pp2[0]["transient"] == 0 < pp2[1]["transient"]  # the logits live on the last stage


def test_encoder_decoder_parameter_count_is_the_built_models():
    stack = StackConfig(num_layers=2, hidden_size=64, num_attention_heads=4)
    cfg = T5Config(encoder=stack, decoder=stack, seq_length=32)
    est = cfg.memory_per_rank(1000, 2, 1, 1, "32", "cpu")
    assert est["params"] == sum(p.numel() for p in EncoderDecoderModel(cfg, 1000).parameters())
    assert est["stages"][0]["activations"] > 0 and est["flops_per_token"] > 0


# (trainer.precision, model.megatron_amp_O2): fp32, autocast, Megatron's layout
LAYOUTS = [("32", False), ("bf16", False), ("16", False), ("bf16", True), ("16", True)]


@pytest.mark.parametrize("precision,o2", LAYOUTS)
@pytest.mark.slow
def test_state_after_a_step_is_the_counted_tensors(tmp_path, corpus, plugins, precision, o2):
    """Weights (+ O2's fp32 main weights), gradients (O2: the fp32 main-gradient buffer)
    and AdamW's moments after one real training step, counted tensor by tensor, are
    exactly what the plan says: 16 bytes per parameter, 18 under O2."""
    cfg = tiny_config(tmp_path, corpus, plugins, model={
        "megatron_amp_O2": o2, "hidden_dropout": 0.0, "attention_dropout": 0.0, "micro_batch_size": 2,
        "global_batch_size": 4, "native_amp_init_scale": 1024.0},  # fp16: a first step that is not skipped
        trainer={"precision": precision, "accelerator": "cpu"})
    run = build_run(cfg, plugins)
    train_step(run)
    counted = counted_state_bytes(run.model, run.optimizer, run.main_params)
    est = estimate(cfg, run.model.vocab_size)
    r = est["rank"]
    n = sum(p.numel() for p in run.model.parameters())
    assert r["params"] == n and counted["optimizer"] > 0
    assert r["weights"] == counted["params"] + counted.get("main params", 0)
    assert r["grads"] == counted["grads"] + counted.get("main grads", 0)
    assert r["optimizer"] == counted["optimizer"]
    assert r["state"] == counted["total"] == est["state_bytes_per_param"] * n
    assert est["state_bytes_per_param"] == (18 if o2 else 16)


class _Casts(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the parameter elements autocast copies to bf16 (each tensor once)."""

    def __init__(self, params):
        super().__init__()
        self.numel = {p.untyped_storage().data_ptr(): p.numel() for p in params}
        self.cast = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten._to_copy.default and kwargs.get("dtype") == torch.bfloat16:
            ptr = args[0].untyped_storage().data_ptr()
            if ptr in self.numel:
                self.cast[ptr] = self.numel[ptr]
        return func(*args, **kwargs)


@pytest.mark.parametrize("name", ["gpt", "bert"])
def test_autocast_copies_are_the_casts_of_a_real_forward(name):
    """The plan's 16-bit copies under autocast: 2 bytes for every parameter element a
    bf16 autocast forward casts (matmul weights and column-parallel biases; not the
    LayerNorms, embeddings or row-parallel biases)."""
    keys = dict(num_layers=2, hidden_size=32, num_attention_heads=4, seq_length=16)
    tok = torch.randint(0, 100, (2, 16))
    batch = {"tokens": tok, "labels": tok, "loss_mask": torch.ones(2, 16)}
    if name == "gpt":
        model = GPTModel(GPTConfig(**keys), 100)
    else:  # pretraining: masked LM (tied decoder with its bias) + pooler + binary head
        model = BertModel(BertConfig(**keys), 100, TASKS["bert"])
        batch.update(tokentype_ids=torch.zeros_like(tok), padding_mask=torch.ones_like(tok),
                     is_random=torch.zeros(2, dtype=torch.long))
    with torch.autocast("cpu", torch.bfloat16), _Casts(list(model.parameters())) as casts:
        model.training_loss(batch)
    raw = {"trainer": {"precision": "bf16"}, "model": dict(keys, name=name, micro_batch_size=2, global_batch_size=2)}
    r = estimate(config_from_dict(raw), 100)["rank"]
    assert r["casts"] == 2 * sum(casts.cast.values()) > 0


def test_megatron_amp_o2_in_the_plan():
    """O2: 16-bit residual stream, so fewer activation bytes than autocast; the gradient
    buffer lives through the forward; refused with fp32, as `mega run` refuses it; under
    pipelining each stage holds its own parameters in the layout's bytes."""
    keys = dict(name="gpt", num_layers=2, hidden_size=64, num_attention_heads=4, seq_length=32, micro_batch_size=2,
                global_batch_size=2)
    cfg = config_from_dict({"trainer": {"precision": "bf16"}, "model": keys})
    autocast, o2 = estimate(cfg, 1000), estimate(cfg, 1000, o2=True)
    assert o2["rank"]["activations"] < autocast["rank"]["activations"]
    assert o2["rank"]["casts"] == 0 < autocast["rank"]["casts"]
    assert o2["rank"]["weights"] == 6 * o2["params"] and o2["rank"]["grads"] == 4 * o2["params"]
    with pytest.raises(ConfigError, match="megatron_amp_O2"):
        estimate(cfg, 1000, o2=True, precision="32")
    staged = estimate(cfg, 1000, o2=True, pp=2)["rank"]
    assert staged["weights"] == 6 * staged["params"] < o2["rank"]["weights"]


def _write(path: Path, raw: dict) -> Path:
    import tomli_w

    path.write_text(tomli_w.dumps(raw))
    return path


def test_run_that_cannot_fit_is_refused_before_anything_is_allocated(tmp_path, corpus, capsys):
    exp = _write(tmp_path / "exp.toml", tiny_raw(tmp_path, corpus))
    assert main(["run", str(exp), "model.seq_length=100000", "trainer.accelerator=cpu"]) == 2
    err = capsys.readouterr().err
    assert "mega: error: the run needs about" in err and "activations" in err and "model.seq_length=100000" in err
    assert not (tmp_path / "results").exists()  # no run directory, no tokenizer, no model


def test_plan_lists_the_layouts_of_4_devices(tmp_path, corpus, capsys):
    raw = tiny_raw(tmp_path, corpus)
    raw["model"].update(micro_batch_size=1, global_batch_size=4)
    exp = _write(tmp_path / "exp.toml", raw)
    assert main(["plan", str(exp), "--devices", "4", "--tflops", "1", "--vocab-size", "500"]) == 0
    out = capsys.readouterr().out
    assert "parameters" in out and "optimizer state" in out and "FLOPs per step" in out and "step time" in out
    assert main(["plan", str(exp), "--devices", "4", "--tflops", "1", "--vocab-size", "500", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    layouts = {(r["tp"], r["pp"], r["dp"]) for r in doc["layouts"]}
    assert {(1, 1, 4), (2, 1, 2), (1, 2, 2), (4, 1, 1), (1, 4, 1), (2, 2, 1)} <= layouts
    assert doc["estimate"]["params"] > 0 and doc["step_time_s"] > 0


# --- activation memory per recomputation mode -------------------------------------------------

FULL_UNIFORM_1 = {"activations_checkpoint_granularity": "full", "activations_checkpoint_method": "uniform",
                  "activations_checkpoint_num_layers": 1}
RECOMPUTE_MODES = {
    "none": {},
    "selective": {"activations_checkpoint_granularity": "selective"},
    "selective core_attn+mlp": {"activations_checkpoint_granularity": "selective", "recompute_modules": ["core_attn", "mlp"]},
    "full/uniform/1": FULL_UNIFORM_1,
    "full/uniform/2": dict(FULL_UNIFORM_1, activations_checkpoint_num_layers=2),
    "full/block/1": dict(FULL_UNIFORM_1, activations_checkpoint_method="block"),
}


def test_activation_bytes_reproduce_the_papers_table_2():
    """Korthikanti et al. 2022, Table 2, per layer with 16-bit activations, 1-byte masks and
    f = 4h: sbh(10 + 24/t) without sequence parallelism, sbh 34/t with it, plus the
    attention core (the paper's unfused 5as^2b/t; mega's is the kernel's) and the LayerNorm
    statistics the paper leaves out (2 LayerNorms x fp32 mean and rstd a token on CUDA,
    split by SP)."""
    from mega.plugins.models.estimates import _attention_bytes, block_activation_bytes
    from mega.plugins.models.transformer import BlockConfig

    s, b, h, a = 128, 2, 256, 8
    block = BlockConfig(num_layers=1, hidden_size=h, num_attention_heads=a)
    for t in (1, 2, 4):
        core = _attention_bytes(block, b, s, s, a // t, 2, "cuda")
        plain = block_activation_bytes(block, b, s, s, t, "bf16", "cuda", o2=True)
        assert plain - core - 16 * s * b == s * b * h * 10 + s * b * h * 24 // t
        split = block_activation_bytes(block, b, s, s, t, "bf16", "cuda", o2=True, sp=True)
        assert split - core - 16 * s * b // t == s * b * h * 34 // t


def _kept(model_name: str, keys: dict, layers: int, precision: str):
    """(bytes of the tensors one training forward leaves alive, the plan's activations of
    the stage): autocast's 16-bit weight copies, which the plan counts apart, taken out."""
    from mega.runtime.tensor_bytes import TensorBytes

    o2 = precision == "bf16-O2"
    base = dict(num_layers=layers, hidden_size=64, num_attention_heads=4, seq_length=32, **keys)
    torch.manual_seed(0)
    tok = torch.randint(0, 256, (2, 32))
    batch = {"tokens": tok, "labels": tok, "loss_mask": torch.ones(2, 32)}
    if model_name == "gpt":
        cfg = GPTConfig(megatron_amp_O2=o2, **base)
        model = GPTModel(cfg, 256)
    else:
        cfg = BertConfig(megatron_amp_O2=o2, masked_lm_prob=0.25, **base)
        model = BertModel(cfg, 256, TASKS["bert"])
        batch["loss_mask"] = (torch.arange(32) < 8).float().expand(2, 32)
        batch.update(tokentype_ids=torch.zeros_like(tok), padding_mask=torch.ones_like(tok),
                     is_random=torch.zeros(2, dtype=torch.long))
    model.train()
    if o2:
        model.to(torch.bfloat16)  # what model.megatron_amp_O2 trains: 16-bit parameters, no autocast
    with TensorBytes() as counted, torch.autocast("cpu", torch.bfloat16, enabled=precision == "bf16"):
        out = model.training_loss(batch)
        live = counted.live
    del out
    stage = cfg.memory_per_rank(256, 2, 1, 1, "32" if precision == "32" else "bf16", "cpu")["stages"][0]
    return live - (2 * stage["matmul_params"] if precision == "bf16" else 0), stage["activations"]


@pytest.mark.parametrize("precision", ["32", "bf16", "bf16-O2"])
@pytest.mark.parametrize("mode", sorted(RECOMPUTE_MODES))
@pytest.mark.slow
def test_llama_activations_are_the_tensors_a_forward_keeps(mode, precision):
    """The Llama options (RoPE's rotated Q and K and its cos/sin, RMSNorm's fp32
    normalised tensors, SwiGLU's three MLP tensors, grouped K and V, an untied head): per
    layer exactly, the stage within 1 KiB."""
    keys = {**LLAMA, "num_query_groups": 2, "ffn_hidden_size": 96, **RECOMPUTE_MODES[mode]}
    counted2, planned2 = _kept("gpt", keys, 2, precision)
    counted3, planned3 = _kept("gpt", keys, 3, precision)
    assert counted3 - counted2 == planned3 - planned2
    assert abs(counted3 - planned3) <= 1024, (counted3, planned3)


@pytest.mark.parametrize("precision", ["32", "bf16", "bf16-O2"])
@pytest.mark.parametrize("mode", sorted(RECOMPUTE_MODES))
@pytest.mark.slow
def test_activations_are_the_tensors_a_forward_keeps(mode, precision):
    """GPT: per layer exactly (3 layers less 2), the stage within 1 KiB (the loss's scalars);
    BERT's heads within 16 KiB."""
    keys = RECOMPUTE_MODES[mode]
    counted2, planned2 = _kept("gpt", keys, 2, precision)
    counted3, planned3 = _kept("gpt", keys, 3, precision)
    assert counted3 - counted2 == planned3 - planned2
    assert abs(counted3 - planned3) <= 1024, (counted3, planned3)
    counted, planned = _kept("bert", keys, 2, precision)
    assert abs(counted - planned) <= 16 * 1024, (counted, planned)


# the attention-dominated shape of SHAPES in each mode: the plan's peak within 15% of the
# measured one, falling from none to selective to full
MODE_SHAPES = [(2, 1000, dict(seq_length=1024, num_layers=2, hidden_size=128, num_attention_heads=4, **keys))
               for keys in (RECOMPUTE_MODES["none"], RECOMPUTE_MODES["selective"], FULL_UNIFORM_1)]


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux's /proc peak-RSS reset")
def test_each_recomputation_mode_is_within_15_percent_of_measured_peak_on_cpu():
    rows = _compare("cpu", MODE_SHAPES)
    measured = [got for _, _, got, _ in rows]
    assert measured[0] > measured[1] > measured[2]


def test_the_refusal_of_mega_run_counts_recomputation(tmp_path, corpus, monkeypatch):
    """Free memory between the peak with and without recomputation: refused without,
    accepted with it; the plan lists the options."""
    import mega.plan as plan

    raw = tiny_raw(tmp_path, corpus)
    raw["trainer"]["accelerator"] = "cpu"
    raw["model"].update(seq_length=512, micro_batch_size=8, global_batch_size=8)
    plain = config_from_dict(raw)
    full = config_from_dict(dict(raw, model=dict(raw["model"], **FULL_UNIFORM_1)))
    vocab = 258
    low, high = estimate(full, vocab)["rank"]["peak"], estimate(plain, vocab)["rank"]["peak"]
    assert low < high
    monkeypatch.setattr(plan, "vocab_size_of", lambda config, given=None: (vocab, "test"))
    monkeypatch.setattr(plan, "available_memory", lambda device: (low + high) // 2)
    with pytest.raises(ConfigError, match="activations"):
        plan.check_fits(plain)
    assert plan.check_fits(full)["rank"]["peak"] == low
    labels = [row["option"] for row in plan.variants(plain, vocab, "cpu")]
    assert "model.activations_checkpoint_granularity=selective" in labels and "  or full (uniform, 1 layer)" in labels
    tp2 = config_from_dict(dict(raw, model=dict(raw["model"], tensor_model_parallel_size=2)))
    assert "model.sequence_parallel=true" in [row["option"] for row in plan.variants(tp2, vocab, "cpu")]

"""mega's GPT training step, eager and compiled, against a compiled nanoGPT-style reference
of the same shape, plus the end-to-end `mega run` figure; tokens/s, MFU and ratios.

One process; the models are built once and timed alternately (a block of steps each, per
repetition), and each row is the median over repetitions, so clock and thermal drift hit
every row alike. Every row counts the same FLOPs per token, nanoGPT's (PaLM appendix B):
6 N + 12 L d T, N = parameters without the position embedding (the tied output layer
counts), against the device's dense bf16 peak (H100 SXM and H200: 989.5 TFLOP/s).

    python benchmarks/bench_gpu.py                          # GPT-2 124M: 12 x 768, seq 1024, vocab 50304, bf16, batch 16
    python benchmarks/bench_gpu.py --batch 32 --loss-chunk-size 4096
    python benchmarks/bench_gpu.py --layers 24 --hidden 1024 --heads 16   # 350M
    python benchmarks/bench_gpu.py --device cpu --tiny      # the plumbing, in seconds (what the tests run)
    python benchmarks/bench_gpu.py --layout both            # autocast rows and model.megatron_amp_O2 rows

Rows: `reference` is a nanoGPT-style model written here (pre-LN blocks, fused QKV, SDPA
causal attention, tanh GELU, tied embeddings, cross entropy on the full logits), always
compiled when compilation is on; `mega eager` and `mega compiled` are GPTModel's
`training_loss` under the same autocast with the same fused AdamW; `mega run` is a
subprocess `mega run` of the same shape (bytes tokenizer, its vocabulary padded to the same
size), tokens/s read from its metrics after the compile steps.

`--layout o2` (or `both`) adds `mega O2 eager` / `mega O2 compiled` / `mega run O2`:
Megatron's mixed-precision layout (`model.megatron_amp_O2`), bf16 parameters without
autocast, fp32 main weights stepped by the same AdamW, gradients accumulated in an fp32
buffer. Every mega row also reports the bytes its training state holds after a step
(parameters, gradients, main weights and buffers, optimizer state), counted tensor by
tensor, so the figure is exact on any device.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
STATE_BYTES = {}  # row -> state_bytes() after its warm-up steps
PEAKS = {"H200": 989.5e12, "H100 NVL": 835e12, "H100 PCIe": 756e12, "H100": 989.5e12, "A100": 312e12}


# --- the reference model ------------------------------------------------------------------------


class RefBlock(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.attn_out = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.up, self.down = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=-1)
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, d)
        x = x + self.attn_out(y)
        return x + self.down(F.gelu(self.up(self.ln2(x)), approximate="tanh"))


class RefGPT(nn.Module):
    """A plain GPT-2 in the nanoGPT style, the peer the issue's table measures against."""

    def __init__(self, layers: int, d: int, heads: int, seq: int, vocab: int):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, d), nn.Embedding(seq, d)
        self.blocks = nn.ModuleList(RefBlock(d, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d)
        for name, p in self.named_parameters():
            if p.dim() == 2:
                std = 0.02 / math.sqrt(2 * layers) if name.endswith(("attn_out.weight", "down.weight")) else 0.02
                nn.init.normal_(p, 0.0, std)
            elif name.endswith("bias"):
                nn.init.zeros_(p)

    def loss(self, tokens, labels):
        pos = torch.arange(tokens.shape[1], device=tokens.device)
        x = self.wte(tokens) + self.wpe(pos)
        for block in self.blocks:
            x = block(x)
        logits = F.linear(self.ln_f(x), self.wte.weight)
        return F.cross_entropy(logits.view(-1, logits.shape[-1]).float(), labels.reshape(-1))


# --- what is timed ------------------------------------------------------------------------------


def _optimizer(model, device: str):
    kw = dict(lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)
    return torch.optim.AdamW(model.parameters(), fused=True, **kw) if device == "cuda" else \
        torch.optim.AdamW(model.parameters(), foreach=True, **kw)


def build(which: str, a):
    """(step function, model) for `reference`, `mega eager` or `mega compiled`."""
    torch.manual_seed(0)
    if which == "reference":
        model = RefGPT(a.layers, a.hidden, a.heads, a.seq, a.vocab).to(a.device)
        loss = model.loss
    else:
        sys.path.insert(0, str(ROOT))
        from mega.config import config_from_dict
        from mega.runtime.main_params import MainParams
        from mega.plugins.models.gpt import GPTModel

        cfg = config_from_dict({"model": {
            "num_layers": a.layers, "hidden_size": a.hidden, "num_attention_heads": a.heads, "seq_length": a.seq,
            "hidden_dropout": 0.0, "attention_dropout": 0.0, "activation": "gelu_tanh",
            "make_vocab_size_divisible_by": a.vocab, "loss_chunk_size": a.loss_chunk_size,
            "attention_backend": a.attention_backend, "tokenizer": {"library": "bytes"}}}).model
        model = GPTModel(cfg, a.vocab).to(a.device)

        def loss(tokens, labels):
            mask = torch.ones_like(labels, dtype=torch.float32)
            return model.training_loss({"tokens": tokens, "labels": labels, "loss_mask": mask})["loss_sum"] / mask.sum()
    compiled = which == "reference" and a.compile or which.startswith("mega") and which.endswith("compiled")
    loss_fn = torch.compile(loss) if compiled else loss
    model.train()
    opt = _optimizer(model, a.device)
    dtype = {"fp32": None, "bf16": torch.bfloat16}[a.dtype]
    if "O2" in which:  # bf16 parameters (converted at the first step), fp32 main weights and gradients
        main = MainParams(model, torch.bfloat16)

        def step(tokens, labels):
            opt.zero_grad(set_to_none=True)
            main.prepare()
            out = loss_fn(tokens, labels)
            out.backward()
            main.reduce_grads()
            opt.step()
            main.copy_to_model()
            return out

        step.state = (model, opt, main)
        return step, model

    def step(tokens, labels):
        opt.zero_grad(set_to_none=True)
        with torch.autocast(a.device, dtype=dtype or torch.float32, enabled=dtype is not None):
            out = loss_fn(tokens, labels)
        out.backward()
        opt.step()
        return out

    step.state = (model, opt, None)
    return step, model


def state_bytes(model, opt, main=None) -> dict:
    """Bytes of the training state after a step, each storage counted once: the model's
    parameters, their gradients, (O2) the fp32 main weights and gradient buffer, and the
    optimizer state. The kernel's count (mega.plan.counted_state_bytes), the one
    `mega plan`'s state figure is tested against."""
    from mega.plan import counted_state_bytes

    return counted_state_bytes(model, opt, main)  # "step peak" (CUDA): added by time_steps


def non_embedding_params(a) -> int:
    """The reference's parameters less the position embedding: the tied word embedding,
    per layer 2 LayerNorms, QKV, the attention output and the MLP (weights and biases),
    and the final LayerNorm."""
    d = a.hidden
    return a.vocab * d + a.layers * (12 * d * d + 13 * d) + 2 * d


def flops_per_token(a) -> float:
    """6 N + 12 L d T (nanoGPT's estimate_mfu, PaLM appendix B)."""
    return 6.0 * non_embedding_params(a) + 12.0 * a.layers * a.hidden * a.seq


def peak(a):
    if a.device != "cuda" or a.dtype != "bf16":
        return None
    name = torch.cuda.get_device_name()
    return next((p for k, p in PEAKS.items() if k in name), None)


def sync(a):
    if a.device == "cuda":
        torch.cuda.synchronize()


def time_steps(a, rows):
    g = torch.Generator().manual_seed(0)
    data = torch.randint(0, a.vocab, (a.batch, a.seq + 1), generator=g).to(a.device)
    tokens, labels = data[:, :-1].contiguous(), data[:, 1:].contiguous()
    steps = {}
    for name in rows:
        t0 = time.perf_counter()
        steps[name] = build(name, a)[0]
        for _ in range(max(1, a.warmup)):  # includes compilation
            steps[name](tokens, labels)
        sync(a)
        print(f"  {name}: built and warmed up in {time.perf_counter() - t0:.1f}s", flush=True)
        if name.startswith("mega"):
            STATE_BYTES[name] = state_bytes(*steps[name].state)
            if a.device == "cuda":  # what one step allocates on top of the state (activations, casts)
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
                steps[name](tokens, labels)
                sync(a)
                STATE_BYTES[name]["step peak"] = torch.cuda.max_memory_allocated() - base
    rates = {n: [] for n in rows}
    for _ in range(a.reps):
        for name in rows:
            sync(a)
            t0 = time.perf_counter()
            for _ in range(a.steps):
                steps[name](tokens, labels)
            sync(a)
            rates[name].append(a.batch * a.seq * a.steps / (time.perf_counter() - t0))
    return {n: statistics.median(r) for n, r in rates.items()}


def mega_run(a, o2: bool = False) -> float:
    """tokens/s of `mega run` at this shape (with `model.megatron_amp_O2` when `o2`): the
    median of the logged intervals after the first (which holds compilation)."""
    log_every = max(1, a.steps)
    steps = log_every * (a.reps + 1)
    with tempfile.TemporaryDirectory() as d:
        corpus = Path(d) / "corpus.txt"
        sys.path.insert(0, str(ROOT))
        from mega.testing import write_corpus

        write_corpus(corpus, lines=max(400, a.batch * a.seq * 4 // 80))
        overrides = [
            f"trainer.max_steps={steps}", f"trainer.log_every_n_steps={log_every}", "trainer.val_check_interval=0",
            f"trainer.precision={'bf16' if a.dtype == 'bf16' else 32}", f"trainer.accelerator={a.device}",
            f"trainer.compile={'true' if a.compile else 'false'}", "trainer.enable_progress_bar=false",
            f"exp_manager.exp_dir={d}", "exp_manager.name=bench", "exp_manager.loggers=[jsonl]",
            "exp_manager.checkpoint.save_last=false", "model.name=gpt", f"model.num_layers={a.layers}",
            f"model.hidden_size={a.hidden}", f"model.num_attention_heads={a.heads}", f"model.seq_length={a.seq}",
            f"model.micro_batch_size={a.batch}", f"model.global_batch_size={a.batch}", "model.hidden_dropout=0.0",
            "model.attention_dropout=0.0", "model.activation=gelu_tanh", f"model.make_vocab_size_divisible_by={a.vocab}",
            f"model.loss_chunk_size={a.loss_chunk_size}", f"model.attention_backend={a.attention_backend}",
            "model.tokenizer.library=bytes", f"model.data.data_prefix=[{corpus}]", "model.data.splits_string=100,0,0",
        ]
        if o2:
            overrides += ["trainer.precision=bf16", "model.megatron_amp_O2=true"]
        exp = Path(d) / "exp.toml"
        exp.write_text("")
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        env.pop("RANK", None)
        proc = subprocess.run([sys.executable, "-m", "mega", "run", str(exp), *overrides], capture_output=True,
                              text=True, env=env, cwd=d)
        if proc.returncode != 0:
            print(proc.stderr[-3000:], file=sys.stderr)
            return float("nan")
        lines = [json.loads(x) for x in (Path(d) / "bench" / "metrics.jsonl").read_text().splitlines()]
        rates = [m["tokens_per_sec"] for m in lines if "tokens_per_sec" in m][1:]
        return statistics.median(rates) if rates else float("nan")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tiny", action="store_true", help="2 layers, hidden 64, seq 64, vocab 512, few steps (CPU plumbing)")
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--vocab", type=int, default=50304)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--dtype", choices=["bf16", "fp32"], default=None, help="default: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--compile", choices=["auto", "on", "off"], default="auto", help="auto: on for CUDA only")
    p.add_argument("--loss-chunk-size", type=int, default=0, help="mega's model.loss_chunk_size")
    p.add_argument("--attention-backend", default="auto", help="mega's model.attention_backend")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10, help="steps per timed block")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--no-run", action="store_true", help="skip the end-to-end `mega run` row")
    p.add_argument("--layout", choices=["autocast", "o2", "both"], default="autocast",
                   help="mega rows: fp32 parameters under autocast (--dtype), Megatron's bf16 parameters with fp32 main"
                        " weights (model.megatron_amp_O2), or both")
    a = p.parse_args(argv)
    if a.tiny:
        a.layers, a.hidden, a.heads, a.seq, a.vocab, a.batch = 2, 64, 4, 64, 512, 4
        a.warmup, a.steps, a.reps = 1, 2, 3
    a.dtype = a.dtype or ("bf16" if a.device == "cuda" else "fp32")
    a.compile = a.device == "cuda" if a.compile == "auto" else a.compile == "on"
    if a.device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    fpt, pk = flops_per_token(a), peak(a)
    where = torch.cuda.get_device_name() if a.device == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    print(f"shape: {a.layers} layers, hidden {a.hidden}, {a.heads} heads, seq {a.seq}, vocab {a.vocab}, batch {a.batch},"
          f" {a.dtype}; {where}; torch {torch.__version__}; compile {'on' if a.compile else 'off'};"
          f" loss_chunk_size {a.loss_chunk_size}; {fpt / 1e6:.0f} MFLOP/token; peak {pk / 1e12 if pk else 'n/a'} TFLOP/s")
    rows = ["reference"]
    if a.layout in ("autocast", "both"):
        rows += ["mega eager"] + (["mega compiled"] if a.compile else [])
    if a.layout in ("o2", "both"):
        rows += ["mega O2 eager"] + (["mega O2 compiled"] if a.compile else [])
    rates = time_steps(a, rows)
    if not a.no_run:
        if a.layout in ("autocast", "both"):
            rates["mega run"] = mega_run(a)
        if a.layout in ("o2", "both"):
            rates["mega run O2"] = mega_run(a, o2=True)
    ref = rates["reference"]
    label = "reference (compiled)" if a.compile else "reference (eager)"
    print(f"{'':24s} {'tokens/s':>12s} {'MFU':>7s} {'vs reference':>13s}")
    for name, r in rates.items():
        mfu = f"{100 * r * fpt / pk:6.1f}%" if pk and r == r else "    n/a"
        print(f"{label if name == 'reference' else name:24s} {r:12,.0f} {mfu} {r / ref:12.3f}x")
    if STATE_BYTES:
        keys = ["params", "grads", "main params", "main grads", "optimizer", "total"]
        keys += ["step peak"] if a.device == "cuda" else []
        print(f"\ntraining state after a step, MiB ({a.dtype} autocast rows: fp32 parameters)")
        print(f"{'':24s}" + "".join(f"{k:>13s}" for k in keys))
        for name, b in STATE_BYTES.items():
            print(f"{name:24s}" + "".join(f"{b.get(k, 0) / 2**20:13.2f}" for k in keys))
    return rates


if __name__ == "__main__":
    main()

"""Training-step speed and memory of mega's Transformer-XL against Hugging Face transformers'
TransfoXLLMHeadModel (`transformers.models.deprecated.transfo_xl`, the port of the original
code; NVIDIA's DeepLearningExamples code does not install from a package) of the same shape.

The protocol of peer.py, which every bench_*_vs_hf.py shares: both models in one process,
timed alternately (forward over the segment and the memory carried from the previous step,
adaptive softmax loss, backward, AdamW step) over several repetitions, median tokens/s of
each and their ratio (also per CPU-second of the process, steadier when other jobs share the
machine); peak memory of each in a fresh subprocess. Both step through the same Zipf-like
token stream, segment after segment, each carrying its own memory (mem_len = tgt_len); the same
architecture on both sides: relative attention with shared r biases, post-LayerNorm, no
same_length, no clamping, the adaptive input and softmax over the same cutoffs with div_val
1 and tied weights. As bench_gpt_vs_hf.py does for GPT2LMHeadModel, Hugging Face is called
as its users call it, `labels=input_ids`: it shifts them inside and so scores tgt_len - 1
positions per row where mega scores tgt_len (tokens/s counts tgt_len on both). Hugging
Face starts from a memory of mem_len zeros, mega from an empty one: the warm-up steps fill it.

The default shape is bench_txl.py's reduced CPU one (4 layers, d_model 512, 8 x 64 heads,
d_inner 2048, tgt = mem = 64, batch 4, vocabulary 32,000 with cutoffs 4000/8000/16000).

    pip install transformers
    python benchmarks/bench_txl_vs_hf.py                          # the reduced base shape, CPU
    python benchmarks/bench_txl_vs_hf.py --layers 4 --d-model 256 --heads 4 --d-inner 1024
    python benchmarks/bench_txl_vs_hf.py --device cuda --layers 16 --tgt 192 --batch 16 --vocab 267735
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import peer  # noqa: E402  (the side-by-side harness the peer benchmarks share)


def cutoffs_of(vocab: int) -> list:
    """bench_txl.py's buckets: WikiText-103's for its vocabulary, else 1/8, 1/4, 1/2 of it."""
    return [19997, 39997, 199997] if vocab > 200_000 else [vocab // 8, vocab // 4, vocab // 2]


def make_stream(a) -> torch.Tensor:
    """[segments, batch, tgt + 1]: the rows of a Zipf-like stream cut into consecutive segments
    (each segment's last token is the next one's first), enough for every step either side takes."""
    g = torch.Generator().manual_seed(0)
    segments = a.warmup + a.reps * a.steps + 3
    probs = 1.0 / torch.arange(1, a.vocab + 1, dtype=torch.float64)
    stream = torch.multinomial(probs / probs.sum(), a.batch * (a.tgt * segments + 1), replacement=True, generator=g)
    rows = stream.view(a.batch, -1)
    segs = torch.stack([rows[:, s * a.tgt: s * a.tgt + a.tgt + 1] for s in range(segments)])
    return segs.to(a.device)


@contextlib.contextmanager
def type_as_with_dtype():
    """The deprecated port calls `tensor.type_as(dtype=...)` in its forward, which torch no longer
    takes (tests/models/test_transformer_xl.py patches it the same way); patched only while
    Hugging Face's forward runs, so mega's side never goes through it."""
    original = torch.Tensor.type_as

    def type_as(self, other=None, dtype=None):
        return self.to(dtype) if other is None else original(self, other)

    torch.Tensor.type_as = type_as
    try:
        yield
    finally:
        torch.Tensor.type_as = original


def build(which: str, a):
    torch.manual_seed(0)
    segment = iter(range(10**9))  # this side's position in the stream; both sides take the same steps
    if which == "mega":
        from mega.plugins.models.transformer_xl import TransformerXLConfig, TransformerXLModel

        cfg = TransformerXLConfig(n_layer=a.layers, d_model=a.d_model, n_head=a.heads, d_head=a.d_head,
                                  d_inner=a.d_inner, dropout=a.dropout, dropatt=a.dropatt, tgt_len=a.tgt,
                                  mem_len=a.tgt, cutoffs=cutoffs_of(a.vocab), div_val=1, global_batch_size=a.batch)
        model = TransformerXLModel(cfg, a.vocab)
        stream_id = torch.zeros(a.batch, dtype=torch.long, device=a.device)
        ones = torch.ones(a.batch, a.tgt, device=a.device)

        def loss_fn(segs):  # the model keeps its memory itself, per stream slot
            seg = segs[next(segment) % len(segs)]
            out = model.training_loss({"tokens": seg[:, :-1], "labels": seg[:, 1:], "loss_mask": ones,
                                       "stream": stream_id})
            return out["loss_sum"] / (a.batch * a.tgt)
    else:
        from transformers.models.deprecated.transfo_xl import TransfoXLConfig, TransfoXLLMHeadModel

        cfg = TransfoXLConfig(vocab_size=a.vocab, cutoffs=cutoffs_of(a.vocab), d_model=a.d_model, d_embed=a.d_model,
                              n_head=a.heads, d_head=a.d_head, d_inner=a.d_inner, div_val=1, pre_lnorm=False,
                              n_layer=a.layers, mem_len=a.tgt, clamp_len=-1, same_length=False,
                              proj_share_all_but_first=True, attn_type=0, sample_softmax=-1, adaptive=True,
                              dropout=a.dropout, dropatt=a.dropatt, untie_r=False, tie_word_embeddings=True)
        model = TransfoXLLMHeadModel(cfg)
        mems = [None]

        def loss_fn(segs):  # the memory goes out and comes back with each call (detached by the model)
            seg = segs[next(segment) % len(segs)]
            with type_as_with_dtype():
                out = model(input_ids=seg[:, :-1], labels=seg[:, :-1], mems=mems[0])
            mems[0] = out.mems
            return out.loss
    return peer.adamw_step(model, loss_fn, a)


# What each side's build() imports, imported by the memory subprocess before its baseline
IMPORTS = {"mega": ("mega.plugins.models.transformer_xl",),
           "hf": ("transformers.models.deprecated.transfo_xl.modeling_transfo_xl",)}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--d-model", type=int, default=512)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--d-head", type=int, default=64)
    p.add_argument("--d-inner", type=int, default=2048)
    p.add_argument("--tgt", type=int, default=64, help="tokens per segment; the memory carries as many")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--vocab", type=int, default=32_000)
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--dropatt", type=float, default=0.0)
    a = peer.parse_args(p)
    a.seq = a.tgt  # peer.alternate() counts batch x seq tokens per step
    if a.memory_child:
        return peer.print_memory_child(a, build, make_stream(a), IMPORTS)
    shape = {"layers": a.layers, "d_model": a.d_model, "heads": a.heads, "d_head": a.d_head, "d_inner": a.d_inner,
             "tgt_len": a.tgt, "mem_len": a.tgt, "batch": a.batch, "vocab": a.vocab, "cutoffs": cutoffs_of(a.vocab),
             "div_val": 1, "dropout": a.dropout, "dropatt": a.dropatt, "dtype": a.dtype, "device": a.device}
    print(f"shape: {a.layers} layers, d_model {a.d_model}, {a.heads} x {a.d_head} heads, d_inner {a.d_inner}, "
          f"tgt = mem = {a.tgt}, batch {a.batch}, vocab {a.vocab} (cutoffs {cutoffs_of(a.vocab)}, div_val 1), "
          f"dropout {a.dropout}, {a.dtype} on {a.device}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    load_before = os.getloadavg()[0]
    s, mem = peer.measure(a, __file__, build, make_stream)
    ratios = peer.report(s, mem, {"mega": "mega Transformer-XL", "hf": "HF TransfoXLLMHeadModel"}, width=24)
    print(json.dumps({
        "shape": shape, "threads": torch.get_num_threads(), "torch": torch.__version__,
        "load_average": [round(load_before, 2), round(os.getloadavg()[0], 2)],  # 1-minute, before and after
        **{w: {"params": s[w]["params"], "tokens_per_sec": round(s[w]["tokens_per_sec"], 1),
               "tokens_per_cpu_sec": round(s[w]["tokens_per_cpu_sec"], 1),
               "runs": [round(r, 1) for r in s[w]["all"]], "peak_mib": round(mem[w], 1)} for w in ("mega", "hf")},
        "ratio_mega_over_hf": {k: round(v, 3) for k, v in ratios.items()}}))


if __name__ == "__main__":
    main()

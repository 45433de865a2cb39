"""Cost of Transformer-XL's adaptive buckets with fixed shapes (every bucket on every row,
kept by torch.where: what a CUDA graph can capture) against the sparse path (each bucket on
the rows `nonzero` finds: one host sync per bucket), forward + backward of the adaptive
embedding and softmax alone, at the WikiText-103 shapes (vocabulary 267,735, cutoffs
19997/39997/199997): base (d 512, div_val 1) and large (d 1024, div_val 4). Tokens are
drawn from a Zipf law over the vocabulary ranks (about 80% fall in the head, as in
WikiText-103). Prints one JSON line per shape: ms per pass of each path, their ratio and
`static_cost` (the FLOP ratio the model uses to choose in eager mode).

    python benchmarks/bench_txl_buckets.py --rows 256 --reps 2
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from mega.plugins.models.adaptive_softmax import AdaptiveEmbedding, ProjectedAdaptiveLogSoftmax

SHAPES = {"base": dict(d=512, div_val=1), "large": dict(d=1024, div_val=4)}
VOCAB, CUTOFFS = 267735, [19997, 39997, 199997]


def zipf_tokens(n: int, generator: torch.Generator) -> torch.Tensor:
    ranks = torch.arange(1, VOCAB + 1, dtype=torch.float64)
    return torch.multinomial(1.0 / ranks, n, replacement=True, generator=generator)


def one_pass(emb, crit, tokens, targets) -> float:
    t0 = time.perf_counter()
    hidden = emb(tokens)
    crit.nll(hidden, targets).sum().backward()
    return (time.perf_counter() - t0) * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, default=256, help="tokens per micro-batch (tgt_len x batch)")
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--shapes", default="base,large")
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    g = torch.Generator().manual_seed(0)
    for name in args.shapes.split(","):
        d, div_val = SHAPES[name]["d"], SHAPES[name]["div_val"]
        emb = AdaptiveEmbedding(VOCAB, d, d, CUTOFFS, div_val).to(args.device)
        for p_ in emb.emb_projs:
            torch.nn.init.normal_(p_, 0, 0.01)
        crit = ProjectedAdaptiveLogSoftmax(VOCAB, d, d, CUTOFFS, div_val, [False, True, True, True], emb).to(args.device)
        tokens, targets = zipf_tokens(args.rows, g).to(args.device), zipf_tokens(args.rows, g).to(args.device)
        times = {}
        for static in (False, True):
            emb.static_shapes = crit.static_shapes = static
            one_pass(emb, crit, tokens, targets)  # warm-up
            times[static] = min(one_pass(emb, crit, tokens, targets) for _ in range(args.reps))
        print(json.dumps({"shape": name, "rows": args.rows, "head_share": float((targets < CUTOFFS[0]).double().mean()),
                          "sparse_ms": round(times[False], 1), "static_ms": round(times[True], 1),
                          "static_over_sparse": round(times[True] / times[False], 2),
                          "softmax_static_cost": round(crit.static_cost(), 2),
                          "embedding_static_cost": round(emb.static_cost(), 2)}), flush=True)


if __name__ == "__main__":
    main()

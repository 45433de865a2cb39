"""Speed of the `word` tokenizer against the reference's line-by-line rules, on a
generated WikiText-like file: counting the vocabulary (what a first run does once) and
encoding the file (every line + <eos>), in tokens/s, and the ratios.

The peer is the Transformer-XL reference's way, written plainly here: per line
`strip().split()` into a Counter, then per line the words + <eos> looked up one by one.
Words are drawn from a Zipf-like distribution over `--words` distinct words, lines of
50-150 words with an empty line now and then, until the file reaches `--mb` megabytes.

    python benchmarks/bench_word_vocab.py                 # 10 MB
    python benchmarks/bench_word_vocab.py --mb 100 --words 200000
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np


def generate(path: Path, mb: float, words: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    vocab = np.array([f"w{i}" for i in range(words)])
    weights = 1.0 / np.arange(1, words + 1) ** 1.1
    weights /= weights.sum()
    target, size = int(mb * 1e6), 0
    with open(path, "w", encoding="utf-8") as f:
        while size < target:
            ids = rng.choice(words, size=(200, 150), p=weights)
            lengths = rng.integers(50, 151, size=200)
            for row, n in zip(ids, lengths):
                line = " " + " ".join(vocab[row[:n]]) + " \n" if rng.random() > 0.05 else " \n"
                f.write(line)
                size += len(line)


def peer(path: Path):
    """(symbols, ids) the reference's way: line by line."""
    counter = Counter()
    with open(path, encoding="utf-8") as f:
        for line in f:
            counter.update(line.strip().split())
    symbols = ["<eos>"] + [s for s, _ in counter.most_common()]
    index = {s: i for i, s in enumerate(symbols)}
    return symbols, index


def peer_encode(path: Path, index) -> np.ndarray:
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            out.append(np.array([index[s] for s in line.strip().split() + ["<eos>"]], dtype=np.int64))
    return np.concatenate(out)


def _best(fn, repeat: int):
    times, result = [], None
    for _ in range(repeat):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return min(times), result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mb", type=float, default=10.0)
    p.add_argument("--words", type=int, default=50000)
    p.add_argument("--repeat", type=int, default=3, help="best of N timings (the machine may be shared)")
    a = p.parse_args()
    from mega.plugins.tokenizers.word import WordConfig, build, count_words

    with tempfile.TemporaryDirectory() as d:
        text = Path(d) / "train.txt"
        generate(text, a.mb, a.words)
        mb = text.stat().st_size / 1e6
        tok = build(WordConfig(), [text], Path(d) / "run")
        count_s, _ = _best(lambda: count_words([text], WordConfig()), a.repeat)
        encode_s, ids = _best(lambda: tok.encode_file(text), a.repeat)
        peer_count_s, (symbols, index) = _best(lambda: peer(text), a.repeat)
        peer_encode_s, peer_ids = _best(lambda: peer_encode(text, index), a.repeat)
        assert symbols == tok.symbols and np.array_equal(ids, peer_ids)
    n = len(ids)
    print(json.dumps({"mb": round(mb, 1), "tokens": n, "vocab": tok.vocab_size,
                      "count_tokens_per_s": round(n / count_s), "peer_count_tokens_per_s": round(n / peer_count_s),
                      "count_ratio": round(peer_count_s / count_s, 2),
                      "encode_tokens_per_s": round(n / encode_s), "peer_encode_tokens_per_s": round(n / peer_encode_s),
                      "encode_ratio": round(peer_encode_s / encode_s, 2)}))


if __name__ == "__main__":
    main()

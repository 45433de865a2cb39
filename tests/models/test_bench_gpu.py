"""benchmarks/bench_gpu.py on the CPU in its `--tiny` mode (the CUDA mode is run by hand on
a GPU, docs/performance.md): every row comes out with a positive rate, and its FLOP count
agrees with the model's own."""
from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _bench():
    spec = importlib.util.spec_from_file_location("bench_gpu", ROOT / "benchmarks" / "bench_gpu.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_flop_count_is_nanogpts_and_agrees_with_the_model():
    """6 N + 12 L d T for GPT-2 124M (N without the position embedding) is 855 MFLOP per
    token at T = 1024 (the figure of the performance notes); mega's own count leaves out
    biases and LayerNorms, well under 1% of it."""
    from types import SimpleNamespace

    from mega.plugins.models.gpt import training_flops_per_token
    from mega.plugins.models.transformer import BlockConfig

    bench = _bench()
    a = SimpleNamespace(layers=12, hidden=768, heads=12, seq=1024, vocab=50304)
    fpt = bench.flops_per_token(a)
    assert fpt / 1e6 == pytest.approx(855, abs=1)
    ours = training_flops_per_token(BlockConfig(num_layers=12, hidden_size=768, num_attention_heads=12), 50304, 1024)
    assert ours == pytest.approx(fpt, rel=1e-2)
    tiny = SimpleNamespace(layers=2, hidden=16, heads=2, seq=8, vocab=40)
    ref = bench.RefGPT(tiny.layers, tiny.hidden, tiny.heads, tiny.seq, tiny.vocab)
    assert bench.non_embedding_params(tiny) == sum(p.numel() for p in ref.parameters()) - tiny.seq * tiny.hidden


@pytest.mark.slow
def test_tiny_cpu_mode_runs(capsys):
    rates = _bench().main(["--device", "cpu", "--tiny", "--loss-chunk-size", "64"])
    assert set(rates) == {"reference", "mega eager", "mega run"}
    assert all(math.isfinite(r) and r > 0 for r in rates.values()), rates
    out = capsys.readouterr().out
    assert "tokens/s" in out and "vs reference" in out

"""The peer benchmarks' memory subprocess (benchmarks/bench_*_vs_hf.py `--memory-child`, at a
tiny shape on the CPU): nothing of either library is imported after the memory baseline is read.

transformers imports lazily: naming a model class loads its modelling code (about 220-240 MiB),
and torch.optim's first optimizer imports torch._dynamo and sympy (about 45 MiB), which
transformers has done already and mega has not. Imported inside the measurement, they land in
one side's peak and not the other's, and the published mega/HF memory ratios were off by about
190 MiB in mega's favour (docs/performance.md)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TINY = ["--layers", "1", "--heads", "2", "--batch", "2", "--vocab", "256"]
SHAPES = {
    "bench_gpt_vs_hf.py": [*TINY, "--hidden", "32", "--seq", "16"],
    "bench_bert_vs_hf.py": [*TINY, "--hidden", "32", "--seq", "16"],
    "bench_llama_vs_hf.py": [*TINY, "--hidden", "32", "--seq", "16", "--groups", "1", "--ffn", "64"],
    "bench_txl_vs_hf.py": [*TINY, "--d-model", "32", "--d-head", "16", "--d-inner", "64", "--tgt", "8"],
}
# Libraries whose import is memory either side's code costs once, not the model's
LIBRARIES = ("mega", "transformers", "torch._dynamo", "sympy")


@pytest.mark.slow
@pytest.mark.parametrize("side", ["mega", "hf"])
@pytest.mark.parametrize("bench", sorted(SHAPES))
def test_no_library_import_inside_the_memory_measurement(bench, side):
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / bench), *SHAPES[bench], "--memory-child", side],
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["peak_mib"] > 0
    late = [m for m in result["imported_after_baseline"] if m.split(".")[0] in LIBRARIES or m.startswith(LIBRARIES)]
    assert late == [], f"{bench} ({side}) imports {late[:10]} inside its memory measurement"

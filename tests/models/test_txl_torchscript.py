"""Transformer-XL's TorchScript inference module equals the eager model (1e-6, fp32), and
`mega export RUN model.pt --torchscript` writes one that a process without mega loads."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from mega.plugins.models.transformer_xl import TransformerXLConfig, TransformerXLModel

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("kw", [dict(div_val=1), dict(div_val=2, d_embed=16, tie_projs=[False, True, True, True]),
                                dict(adaptive=False, pre_lnorm=True), dict(div_val=1, d_embed=8, tie_weight=False),
                                dict(div_val=2, d_embed=16, tie_weight=False)])  # separate tables, shared projections
@pytest.mark.slow
def test_scripted_module_equals_eager_across_segments(kw):
    torch.manual_seed(0)
    cfg = TransformerXLConfig(n_layer=2, d_model=16, n_head=2, d_head=8, d_inner=32, dropout=0.1, cutoffs=[20, 50, 80],
                              tgt_len=6, mem_len=6, global_batch_size=2, **kw)
    model = TransformerXLModel(cfg, 100).eval()
    scripted = model.to_torchscript(mem_len=8, clamp_len=5, same_length=True)
    assert isinstance(scripted, torch.jit.ScriptModule)
    tokens = torch.randint(0, 100, (19, 3))
    mems, eager_mems = scripted.init_mems(3), None
    with torch.no_grad():
        for s in range(3):
            x, y = tokens[6 * s: 6 * s + 6], tokens[6 * s + 1: 6 * s + 7]
            logp, new_mems = scripted(x, mems)
            nll, _ = scripted.nll(x, y, mems)
            h, eager_mems = model.hidden(x, eager_mems, mem_len=8, clamp_len=5, same_length=True)
            torch.testing.assert_close(logp, model.crit.log_prob(h.reshape(-1, 16)).view(6, 3, 100), rtol=0, atol=1e-6)
            torch.testing.assert_close(nll, model.crit.nll(h.reshape(-1, 16), y.reshape(-1)).view(6, 3), rtol=0, atol=1e-6)
            torch.testing.assert_close(new_mems, eager_mems, rtol=0, atol=1e-6)
            mems = new_mems


@pytest.mark.slow
def test_export_writes_a_module_that_loads_without_mega(tmp_path, corpus):
    """Train 2 steps, export with the CLI, load in a subprocess whose sys.path cannot reach
    mega, and compare with the eager model's outputs here."""
    from tests.helpers.txl import txl_raw

    import tomli_w

    from mega.cli import main
    from mega.checkpoint import restore

    exp = tmp_path / "txl.toml"
    exp.write_text(tomli_w.dumps(txl_raw(tmp_path, corpus, trainer={"max_steps": 2, "val_check_interval": 0})))
    assert main(["run", str(exp)]) == 0
    run_dir = tmp_path / "results" / "txl"
    out = tmp_path / "txl.pt"
    assert main(["export", str(run_dir), str(out), "--torchscript"]) == 0
    model, _, config = restore(run_dir)
    tokens = torch.randint(0, 258, (16, 2))
    torch.save(tokens, tmp_path / "tokens.pt")
    script = textwrap.dedent(f"""
        import sys
        sys.path = [p for p in sys.path if "site-packages" in p or p.endswith(".zip") or "lib/python" in p]
        try:
            import mega
            raise SystemExit("mega is importable")
        except ImportError:
            pass
        import torch
        m = torch.jit.load({str(out)!r})
        tokens = torch.load({str(tmp_path / 'tokens.pt')!r})
        mems = m.init_mems(2)
        with torch.no_grad():
            a, mems = m(tokens[:8], mems)
            b, mems = m(tokens[8:], mems)
        torch.save({{"a": a, "b": b, "mems": mems}}, {str(tmp_path / 'out.pt')!r})
    """)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    env["PYTHONNOUSERSITE"] = "1"
    proc = subprocess.run([sys.executable, "-S", "-c", script], capture_output=True, text=True, timeout=120, env=env,
                          cwd=tmp_path)
    if "No module named 'torch'" in proc.stderr:  # -S also dropped site-packages: add only torch's
        site = str(Path(torch.__file__).parents[1])
        script = script.replace("import sys\n", f"import sys\nsys.path.append({site!r})\n", 1)
        proc = subprocess.run([sys.executable, "-S", "-c", script], capture_output=True, text=True, timeout=120, env=env,
                              cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    got = torch.load(tmp_path / "out.pt")
    ev = config.model.eval_settings()
    with torch.no_grad():
        h1, m1 = model.hidden(tokens[:8], None, ev["mem_len"], ev["clamp_len"], ev["same_length"])
        h2, m2 = model.hidden(tokens[8:], m1, ev["mem_len"], ev["clamp_len"], ev["same_length"])
    torch.testing.assert_close(got["a"], model.crit.log_prob(h1.reshape(-1, 32)).view(8, 2, -1), rtol=0, atol=1e-6)
    torch.testing.assert_close(got["b"], model.crit.log_prob(h2.reshape(-1, 32)).view(8, 2, -1), rtol=0, atol=1e-6)
    torch.testing.assert_close(got["mems"], m2, rtol=0, atol=1e-6)
    extra = {"config.toml": ""}
    torch.jit.load(str(out), _extra_files=extra)
    assert b'name = "transformer_xl"' in extra["config.toml"]


@pytest.mark.slow
def test_mega_evaluate_runs_the_protocol_eagerly_and_through_torchscript(tmp_path, corpus):
    """`mega evaluate` asks the model (Evaluates): the whole test split at the eval_*
    settings, equal to scoring the split's token stream directly, and the same through the
    scripted module (--torchscript)."""
    import json

    import tomli_w

    from mega.cli import main
    from mega.checkpoint import restore
    from mega.plugin_manager import get_plugins
    from tests.helpers.txl import txl_raw

    raw = txl_raw(tmp_path, corpus, trainer={"max_steps": 2, "val_check_interval": 0},
                  model={"eval_tgt_len": 16, "eval_mem_len": 40, "eval_clamp_len": 20, "eval_same_length": True,
                         "eval_batch_size": 8})
    exp = tmp_path / "txl.toml"
    exp.write_text(tomli_w.dumps(raw))
    assert main(["run", str(exp)]) == 0
    run_dir = tmp_path / "results" / "txl"
    assert main(["evaluate", str(run_dir), "--split", "test"]) == 0
    assert main(["evaluate", str(run_dir), "--split", "test", "--torchscript", "--output", str(tmp_path / "ts.json")]) == 0
    eager = json.loads((run_dir / "eval_test.json").read_text())
    scripted = json.loads((tmp_path / "ts.json").read_text())
    model, tokenizer, config = restore(run_dir)
    plugins = get_plugins()
    source = plugins.datasets.get("lm_ordered").factory(config.model.data, run_dir)
    direct = model.evaluate_stream(source.token_stream("test", tokenizer))
    assert eager["tokens"] == scripted["tokens"] == direct["tokens"] > 0
    assert eager["loss"] == pytest.approx(direct["loss"], rel=1e-9)
    assert scripted["loss"] == pytest.approx(eager["loss"], rel=1e-6)
    assert eager["perplexity"] == pytest.approx(torch.tensor(eager["loss"]).exp().item(), rel=1e-6)
    assert (eager["eval_tgt_len"], eager["eval_mem_len"], eager["eval_clamp_len"]) == (16, 40, 20)

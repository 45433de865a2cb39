"""Device choice on a machine with GPUs, checked here with torch's CUDA queries faked:
more workers than GPUs is a config error before any worker starts; CPU workers (gloo)
run anywhere. Every multi-process test pins `trainer.accelerator = "cpu"` so the suite
passes on a CUDA machine too."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from mega.cli import main
from mega.errors import ConfigError
from mega.runtime.parallel import accelerator_type, check_devices, pick_device

ROOT = Path(__file__).resolve().parents[2]


def _gpus(monkeypatch, n: int):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: n > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: n)


@pytest.mark.parametrize("accelerator", ["auto", "gpu"])
def test_more_workers_than_gpus_is_a_config_error_naming_the_count(monkeypatch, accelerator):
    _gpus(monkeypatch, 1)
    with pytest.raises(ConfigError, match=r"trainer.devices=2: this machine has 1 CUDA device .*trainer.accelerator=\"cpu\""):
        check_devices(accelerator, 2)
    assert check_devices(accelerator, 1) == "cuda"


def test_cpu_workers_run_on_a_gpu_machine(monkeypatch):
    _gpus(monkeypatch, 1)
    assert check_devices("cpu", 4) == "cpu" and pick_device("cpu", 3) == torch.device("cpu")
    _gpus(monkeypatch, 0)
    assert check_devices("auto", 2) == "cpu" and accelerator_type("auto") == "cpu"
    with pytest.raises(ConfigError, match="trainer.accelerator"):
        check_devices("gpu", 1)


def test_mega_run_refuses_before_launching(monkeypatch, tmp_path, corpus, capsys):
    """`mega run ... trainer.devices=2` on a one-GPU machine: exit 2 with the config error,
    no worker started, no run directory written."""
    from mega.testing import tiny_raw
    import tomli_w

    _gpus(monkeypatch, 1)
    exp = tmp_path / "exp.toml"
    exp.write_text(tomli_w.dumps(tiny_raw(tmp_path, corpus)))
    assert main(["run", str(exp), "trainer.devices=2"]) == 2
    assert "trainer.devices=2: this machine has 1 CUDA device" in capsys.readouterr().err
    assert not (tmp_path / "results").exists()


def test_mega_run_finds_a_read_only_checkpoints_folder_before_launching(monkeypatch, tmp_path, corpus, capsys):
    """Issue 20, item 2, with workers: the launcher reports a read-only checkpoints/ (exit 2,
    one line) before starting any worker."""
    import errno

    import tomli_w

    from mega.runtime import launch
    from mega.testing import tiny_raw
    from mega.training import run_dir as run_dir_mod

    exp = tmp_path / "exp.toml"
    exp.write_text(tomli_w.dumps(tiny_raw(tmp_path, corpus, trainer={"accelerator": "cpu"})))
    (tmp_path / "results" / "tiny" / "checkpoints").mkdir(parents=True)
    real_open = open

    def read_only_checkpoints(path, *args, **kwargs):  # tests run as root, where chmod does not stop writes
        if ".mega-write-probe" in str(path) and "checkpoints" in str(path):
            raise PermissionError(errno.EROFS, "Read-only file system", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(run_dir_mod, "open", read_only_checkpoints, raising=False)
    monkeypatch.setattr(launch, "launch_local_workers", lambda *a, **k: pytest.fail("workers were started"))
    assert main(["run", str(exp), "trainer.devices=2"]) == 2
    err = capsys.readouterr().err
    assert "tiny/checkpoints (Read-only file system); checkpoints could not be saved" in err and "Traceback" not in err


def test_every_multi_process_test_pins_the_cpu():
    """A test file that starts several workers (trainer.devices > 1 or run_ranks with
    build_run) must say `accelerator` = cpu somewhere, else on a GPU machine its workers
    would each ask for their own GPU."""
    offenders = []
    for path in sorted((ROOT / "tests").rglob("test_*.py")):
        text = path.read_text()
        multi = re.search(r"devices[\"']?\s*[:=]\s*(state\.world_size|[2-9])", text) or "devices=2" in text
        if path.name in ("test_devices.py", "test_plan.py") or not multi:
            continue
        # configs built by a shared helper (tests/helpers/*.py) pin the CPU there
        helpers = re.findall(r"from tests\.helpers\.(\w+) import", text)
        pinned = any("accelerator" in (ROOT / "tests" / "helpers" / f"{h}.py").read_text() for h in helpers)
        if "accelerator" not in text and "_exp(" not in text and not pinned:
            offenders.append(path.name)
    assert not offenders, offenders


def test_plugin_tests_run_on_each_device(mega_device):
    """The `mega_device` fixture: "cpu", and "cuda" only where a GPU is present."""
    assert mega_device in ("cpu", "cuda")
    x = torch.ones(2, device=mega_device)
    assert x.device.type == mega_device


def test_contrib_plugins_with_tensors_test_on_each_device():
    """Each contrib plugin whose tests build tensors takes `mega_device` in at least one."""
    for tests in sorted(ROOT.glob("contrib/*/tests")):
        text = "".join(p.read_text() for p in tests.rglob("test_*.py"))
        if "torch." in text:
            assert "mega_device" in text, tests.parent.name


@pytest.mark.parametrize("name,peak", [("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 NVL", 835e12),
                                       ("NVIDIA H100 PCIe", 756e12), ("NVIDIA H200", 989e12), ("Some GPU", None)])
def test_mfu_peak_by_device_name(name, peak):
    """Dense bf16 peaks (torchtitan's table): the NVL and PCIe H100s are not the SXM part."""
    from mega.runtime.device_peaks import peak_for_name

    assert peak_for_name(name) == peak

"""benchmarks/gpu_session.sh, the prepared GPU checks: it parses, and a part it does not
know is refused before anything is installed or run (a lease's minutes are not spent on a
typo)."""
import subprocess
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_session.sh"


def test_the_script_parses():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


def test_an_unknown_part_is_refused_first(tmp_path):
    out = subprocess.run(["bash", str(SCRIPT), "env", "bogus"], capture_output=True, text=True,
                         env={"OUT": str(tmp_path), "PATH": "/usr/bin:/bin"})
    assert out.returncode == 2 and "unknown part bogus" in out.stderr
    assert not (tmp_path / "summary.txt").exists()

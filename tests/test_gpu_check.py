"""bench/gpu_check.py runs on a machine with jax and no TensorFlow or seqio (a GPU machine): here on the
CPU, tiny shapes, with both made unimportable, it trains every shape with each kernel and prints the table."""

import os
import re
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "bench", "gpu_check.py")
# None in sys.modules makes `import tensorflow` (and the rest) raise ImportError, as on a machine without them.
WITHOUT_TENSORFLOW = (
    "import runpy, sys\n"
    "for name in ('tensorflow', 'tensorflow_datasets', 'seqio'):\n"
    "    sys.modules[name] = None\n"
    f"sys.argv = [{SCRIPT!r}] + sys.argv[1:]\n"
    f"runpy.run_path({SCRIPT!r}, run_name='__main__')\n"
)


def run_gpu_check(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")
    env.pop("PYTHONPATH", None)  # the script finds t5lite itself, as it must on the GPU machine
    return subprocess.run([sys.executable, "-c", WITHOUT_TENSORFLOW, *args], cwd="/", env=env,
                          capture_output=True, text=True, timeout=900)


@pytest.mark.slow
def test_tiny_run_without_tensorflow_prints_a_row_per_configuration():
    done = run_gpu_check("--tiny", "--steps", "2")
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert lines[0].startswith("device: cpu") and "peak unknown" in lines[0], lines[0]
    assert lines[1].split() == ["shape", "attention", "batch", "lengths", "compile", "s", "step", "ms", "tokens/s",
                                "MFU", "loss"]
    rows = {tuple(line.split()[:2]): line.split() for line in lines[2:]}
    assert set(rows) == {(shape, impl) for shape in ("t5_1_1_tiny", "llama_tiny")
                         for impl in ("xla", "dot_product_attention")}, done.stdout
    for row in rows.values():
        assert "failed:" not in row, done.stdout
        step_ms, tokens_per_s, mfu, loss = float(row[5]), float(row[6]), row[7], float(row[8])
        assert step_ms > 0 and tokens_per_s > 0 and mfu == "-" and 0 < loss < 20, row


def test_cudnn_row_on_a_cpu_says_why_and_a_bad_option_is_one_line():
    done = run_gpu_check("--tiny", "--only", "cudnn,llama", "--steps", "1")
    assert done.returncode == 0, done.stderr[-3000:]
    assert re.search(r"llama_tiny\s+cudnn .* failed: UserError: .*needs an NVIDIA GPU", done.stdout), done.stdout
    done = run_gpu_check("--only", "flash")
    assert done.returncode == 2 and done.stderr.strip().splitlines() == [
        "error: --only flash: choose among ['llama', 't5'] and ['xla', 'dot_product_attention', 'cudnn']."]

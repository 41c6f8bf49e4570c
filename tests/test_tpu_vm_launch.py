"""launch/tpu_vm.sh --dry_run: the gcloud commands it would run, in order (no cloud needed); and
launch/tpu_worker_setup.sh, the setup it runs on every worker, for real on this machine."""

import os
import re
import shlex
import shutil
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "launch", "tpu_vm.sh")
SETUP = os.path.join(REPO, "launch", "tpu_worker_setup.sh")
TRAIN = ["python", "-m", "t5lite.train", "--gin_file=gin/base.gin", '--gin.MODEL_DIR="gs://bucket/run"']


def _dry_run(*options, command=TRAIN):
    done = subprocess.run(["bash", SCRIPT, "--dry_run", *options, "--", *command], cwd=REPO,
                          capture_output=True, text=True, timeout=30)
    return done.returncode, [shlex.split(line) for line in done.stdout.splitlines()], done.stderr


def test_dry_run_creates_installs_runs_on_all_workers_then_deletes():
    code, commands, err = _dry_run("--name=t5-xl", "--zone=us-central2-b", "--accelerator_type=v4-32", "--spot")
    assert code == 0, err
    steps = [c[4] if c[0] == "gcloud" else c[0] for c in commands]
    assert steps == ["create", "git", "scp", "ssh", "ssh", "delete"]
    create, _, scp, install, train, delete = commands
    assert create[5:] == ["t5-xl", "--zone=us-central2-b", "--accelerator-type=v4-32",
                          "--version=tpu-ubuntu2204-base", "--spot"]
    assert all("--worker=all" in c for c in (scp, install, train))
    assert install[-1].endswith("cd t5lite && bash launch/tpu_worker_setup.sh")
    run = train[-1].removeprefix("--command=")
    # The remote shell gets the train command exactly as given (quotes included), in the setup's
    # environment, and prefixes output.
    assert shlex.split(run.split(" 2>&1")[0]) == ["cd", "t5lite", "&&", ".", "~/t5lite-venv/bin/activate", "&&",
                                                   *TRAIN]
    assert 'sed -u "s/^/[$(hostname)] /"' in run
    assert delete[4:] == ["delete", "t5-xl", "--zone=us-central2-b", "--quiet"]
    assert not os.path.exists(os.path.join(REPO, "tpu_vm-t5-xl.log"))


def test_keep_leaves_the_slice_and_missing_options_are_refused():
    code, commands, _ = _dry_run("--name=a", "--zone=z", "--accelerator_type=v5litepod-8", "--keep", "--project=p")
    assert code == 0 and commands[-1][4] == "ssh" and "--project=p" in commands[0]
    code, _, err = _dry_run("--name=a", "--zone=z")
    assert code == 2 and "usage" in err


@pytest.mark.parametrize("accelerator,version", [
    ("v4-32", "tpu-ubuntu2204-base"), ("v5litepod-8", "v2-alpha-tpuv5-lite"), ("v5p-8", "v2-alpha-tpuv5"),
    ("v6e-8", "v2-alpha-tpuv6e")])
def test_software_version_follows_the_accelerator_unless_given(accelerator, version):
    code, commands, err = _dry_run("--name=a", "--zone=z", f"--accelerator_type={accelerator}")
    assert code == 0, err
    assert f"--version={version}" in commands[0]
    code, commands, _ = _dry_run("--name=a", "--zone=z", f"--accelerator_type={accelerator}", "--version=custom")
    assert "--version=custom" in commands[0] and f"--version={version}" not in commands[0]


@pytest.mark.slow
def test_worker_setup_builds_a_python_311_environment_with_jax_tpu_and_reuses_it(tmp_path):
    """The worker setup, run here as on a TPU VM (outside any virtual environment, with uv installed
    by pip --user when missing), on a tree whose requirements.txt pins only jax: it must end with
    Python 3.11 and jax[tpu] of that version (libtpu included); a second run reuses the environment."""
    tree = tmp_path / "t5lite"
    (tree / "launch").mkdir(parents=True)
    shutil.copy(SETUP, tree / "launch")
    jax_pin = next(line for line in open(os.path.join(REPO, "requirements.txt")) if line.startswith("jax=="))
    (tree / "requirements.txt").write_text(jax_pin)
    venv = tmp_path / "venv"
    path = os.pathsep.join(p for p in os.environ["PATH"].split(os.pathsep) if not p.startswith(sys.prefix))
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    env.update(PATH=path, T5LITE_VENV=str(venv), PYTHONUSERBASE=str(tmp_path / "user"))

    def setup():
        done = subprocess.run(["bash", "launch/tpu_worker_setup.sh"], cwd=tree, env=env, capture_output=True,
                              text=True, timeout=1200)
        assert done.returncode == 0, done.stderr[-3000:]
        return done.stdout

    jax_version = jax_pin.strip().split("==")[1]
    assert re.search(rf"{venv}/bin/python\S*: Python 3\.11\.\d+, jax {re.escape(jax_version)}$", setup().strip())
    if shutil.which("uv", path=path) is None:
        assert (tmp_path / "user" / "bin" / "uv").exists()
    libtpu = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "show", "libtpu"], capture_output=True,
                            text=True)
    assert libtpu.returncode == 0, libtpu.stderr
    created = (venv / "pyvenv.cfg").stat().st_mtime_ns
    assert jax_version in setup()
    assert (venv / "pyvenv.cfg").stat().st_mtime_ns == created

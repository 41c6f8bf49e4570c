"""launch/tpu_vm.sh --dry_run: the gcloud commands it would run, in order (no cloud needed)."""

import os
import shlex
import subprocess

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "launch", "tpu_vm.sh")
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
    assert "pip install -q -r requirements.txt 'jax[tpu]==0.10.2'" in install[-1]
    run = train[-1].removeprefix("--command=")
    # The remote shell gets the train command exactly as given (quotes included), and prefixes output.
    assert shlex.split(run.split(" 2>&1")[0]) == ["cd", "t5lite", "&&", *TRAIN]
    assert 'sed -u "s/^/[$(hostname)] /"' in run
    assert delete[4:] == ["delete", "t5-xl", "--zone=us-central2-b", "--quiet"]
    assert not os.path.exists(os.path.join(REPO, "tpu_vm-t5-xl.log"))


def test_keep_leaves_the_slice_and_missing_options_are_refused():
    code, commands, _ = _dry_run("--name=a", "--zone=z", "--accelerator_type=v5litepod-8", "--keep", "--project=p")
    assert code == 0 and commands[-1][4] == "ssh" and "--project=p" in commands[0]
    code, _, err = _dry_run("--name=a", "--zone=z")
    assert code == 2 and "usage" in err

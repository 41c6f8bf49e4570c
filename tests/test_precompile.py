"""Ahead-of-time compilation for TPU slices on this CPU (libtpu's compiler, no TPU)."""

import importlib.util
import os
import re
import subprocess
import sys

import pytest

from t5lite.errors import UserError
from t5lite.precompile import parse_topology

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("name", ["v7x:2x2", "v5e", "v5e:2by2", "tpu:2x2"])
def test_unknown_topology_names_the_known_generations(name):
    with pytest.raises(UserError, match=r"Unknown TPU topology .*\['v4', 'v5e', 'v5p', 'v6e'\]"):
        parse_topology(name)


def test_topology_counts_its_chips():
    assert parse_topology("v5p:4x4x8").chips == 128
    assert parse_topology("v5e:2x2").chips == 4


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                    reason="libtpu is not installed (pip install -r requirements-tpu.txt)")
def test_tiny_model_compiles_for_v5e_2x2_and_reports_memory_and_mfu():
    done = subprocess.run(
        [sys.executable, "-m", "t5lite.precompile", "--gin_file=gin/base.gin", "--gin_file=gin/models/t5_1_1_tiny.gin",
         '--gin.TOPOLOGY="v5e:2x2"', "--gin.train.partitioning_preset='fsdp'", "--gin.make_mesh.fsdp=2"],
        cwd=REPO, capture_output=True, text=True, timeout=900)  # two compiles; minutes on a busy CPU
    assert done.returncode == 0, done.stderr[-3000:]
    print(done.stdout)
    out = done.stdout
    assert "topology v5e:2x2: 4 chips, 197 TFLOP/s bf16 and 16.00 GiB HBM per chip" in out
    total = re.search(r"total (\d+\.\d+) GiB of 16.00 GiB: fits", out)
    assert total and 0 < float(total.group(1)) < 1, out
    flops = re.search(r"cost analysis per chip: (\d+\.\d+) TFLOP", out)
    assert flops and float(flops.group(1)) > 0, out
    model_flops = re.search(r"model FLOPs \(analytic, no rematerialisation\) (\d+\.\d+) TFLOP", out)
    assert model_flops and float(model_flops.group(1)) > 0, out
    mfu = re.search(r"MFU at most (\d+\.\d)%", out)
    assert mfu and 0 < float(mfu.group(1)) <= 100, out

"""Ahead-of-time compilation for TPU slices on this CPU (libtpu's compiler, no TPU)."""

import dataclasses
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
         '--gin.TOPOLOGY="v5e:2x2"', "--gin.TrainConfig.partitioning_preset='fsdp'", "--gin.make_mesh.fsdp=2"],
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


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                    reason="libtpu is not installed (pip install -r requirements-tpu.txt)")
@pytest.mark.parametrize("model_gin, preset, mesh", [
    ("t5_1_1_tiny.gin", "fsdp", "--gin.make_mesh.fsdp=2"),
    ("decoder_only_tiny.gin", "tp", "--gin.make_mesh.tensor=2"),
])
def test_decoding_compiles_for_v5e_2x2_and_reports_its_memory(model_gin, preset, mesh):
    done = subprocess.run(
        [sys.executable, "-m", "t5lite.precompile", "--gin_file=gin/base.gin", f"--gin_file=gin/models/{model_gin}",
         '--gin.TOPOLOGY="v5e:2x2"', f"--gin.TrainConfig.partitioning_preset='{preset}'", mesh,
         "--gin.TASK_FEATURE_LENGTHS={'inputs': 64, 'targets': 16}", "--gin.BATCH_SIZE=8", "--decode"],
        cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    print(done.stdout)
    out = done.stdout
    assert "topology v5e:2x2: 4 chips, 16.00 GiB HBM per chip" in out
    assert "decoding (t5lite.eval / infer): batch 8, greedy, 16 new tokens" in out
    memory = re.search(r"memory per chip: parameters (\d+\.\d+) MiB, decoding copy (\d+\.\d+) MiB, caches and "
                       r"temporaries (\d+\.\d+) MiB", out)
    assert memory, out
    params, copy, temporaries = map(float, memory.groups())
    # The decoding copy holds the matmul weights in bfloat16 (TPU's compute dtype): about half.
    assert params > 0 and copy == pytest.approx(params / 2, rel=0.1) and temporaries > 0, out
    assert re.search(r"total \d+\.\d+ MiB of 16.00 GiB: fits", out), out


@pytest.mark.slow
def test_precompile_lowers_exactly_the_train_step_that_train_runs(tmp_path, monkeypatch):
    """A LoRA fine-tuning run from a checkpoint (adaptation and schedule offset included): the program
    train runs, lowered with the arguments it ran with, is the program precompile lowers from shapes."""
    import gin
    import jax

    from t5lite import precompile, trainer
    from t5lite import train as train_lib
    from t5lite.model.config import TransformerConfig

    tiny = ["--gin_file=gin/base.gin", "--gin_file=gin/models/t5_1_1_tiny.gin", "--gin.BATCH_SIZE=4",
            "--gin.TASK_FEATURE_LENGTHS={'inputs': 32, 'targets': 8}", "--gin.EvalConfig.batches=1"]
    pre = tmp_path / "pre"
    assert train_lib.main([*tiny, f"--gin.MODEL_DIR='{pre}'", "--gin.TRAIN_STEPS=3"]) == 0

    ran = {}
    build = trainer.build_train_program

    def recording_build(*args, **kwargs):
        program = build(*args, **kwargs)
        ran["program"] = program

        def step(state, batch, rng):
            if "text" not in ran:
                ran["text"] = program.step.lower(state, batch, rng).as_text()
            return program.step(state, batch, rng)

        return dataclasses.replace(program, step=step)

    monkeypatch.setattr(trainer, "build_train_program", recording_build)
    gin.clear_config()
    assert train_lib.main([*tiny, f"--gin.MODEL_DIR='{tmp_path / 'lora'}'", "--gin.TRAIN_STEPS=1",
                           f"--gin.CheckpointConfig.initial_checkpoint_path='{pre}/checkpoints/3'",
                           "--gin.make_adaptation.lora_patterns=['attention/query$']"]) == 0
    monkeypatch.setattr(trainer, "build_train_program", build)
    # gin still holds the run's configuration: precompile reads the same TrainConfig.
    lowered = precompile.lower_train_step(jax.devices(), TransformerConfig()).as_text()
    assert type(ran["program"].adaptation).__name__ == "LoraAdaptation" and ran["program"].initial_step == 3
    assert lowered == ran["text"]

"""MFU, peak table, profile range and the efficiency metrics a training run logs."""

import glob
import json
import os
import re
from types import SimpleNamespace

import gin
import jax
import pytest

from t5lite import observability, summaries
from t5lite import train as train_lib
from t5lite.errors import UserError
from t5lite.model.config import TransformerConfig

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_mfu_matches_a_hand_computation():
    config = TransformerConfig(vocab_size=32, emb_dim=8, num_heads=2, head_dim=4, mlp_dim=16,
                               num_encoder_layers=1, num_decoder_layers=1)
    shapes = {"encoder_input_tokens": (2, 4), "decoder_input_tokens": (2, 3)}  # batch 2, 8 enc / 6 dec tokens
    # Forward FLOPs by hand (2 per multiply-add; heads x head_dim = 8):
    encoder = (2 * 8 * 8 * (2 * 8 + 2 * 8)  # q, out on 8 tokens; k, v on 8 tokens
               + 2 * 2 * 2 * 4 * 4 * 8  # scores and values: batch 2, 4 x 4, hd 8
               + 2 * 8 * 3 * 8 * 16)  # gated MLP: 3 matmuls 8 x 16 on 8 tokens
    self_attention = 2 * 8 * 8 * (2 * 6 + 2 * 6) + 2 * 2 * 2 * 3 * 3 * 8
    cross_attention = 2 * 8 * 8 * (2 * 6 + 2 * 8) + 2 * 2 * 2 * 3 * 4 * 8
    decoder_mlp = 2 * 6 * 3 * 8 * 16
    logits = 2 * 6 * 8 * 32
    forward = encoder + self_attention + cross_attention + decoder_mlp + logits
    assert forward == 26944
    step_flops = observability.train_step_flops(config, shapes)
    assert step_flops == 3 * forward
    # 2 steps of 80832 FLOPs in 2 ms on a 1e8 FLOP/s device: 80.832% of its peak.
    clock = iter([0.0, 2e-3, 2e-3, 5.0, 5.0]).__next__  # start; then each metrics() call and the next start
    timer = observability.IntervalTimer(step_flops, peak_flops=1e8, clock=clock)
    timer.add_data_wait(5e-4)
    timer.add_step(real_tokens=10, all_tokens=14)
    timer.add_step(real_tokens=12, all_tokens=14)
    metrics = timer.metrics(jax.devices()[0])
    assert metrics["mfu"] == pytest.approx(0.80832)
    assert metrics["step_seconds"] == pytest.approx(1e-3) and metrics["data_wait_seconds"] == pytest.approx(2.5e-4)
    assert metrics["steps_per_s"] == pytest.approx(1000) and metrics["real_tokens_per_s"] == pytest.approx(11000)
    assert metrics["tokens_per_s"] == pytest.approx(14000)
    # The next interval starts afresh; 4 s of it went to an evaluation, left out of its rates.
    timer.add_step(real_tokens=14, all_tokens=14)
    timer.exclude(4.0)
    metrics = timer.metrics(jax.devices()[0])
    assert metrics["step_seconds"] == pytest.approx(1.0 - 2e-3) and metrics["data_wait_seconds"] == 0


@pytest.mark.parametrize("kind,peak", [("TPU v4", 275e12), ("TPU v5 lite", 197e12), ("TPU v5p", 459e12),
                                       ("TPU v6 lite", 918e12), ("NVIDIA H100 80GB HBM3", 989e12),
                                       ("NVIDIA A100-SXM4-40GB", 312e12)])
def test_peak_table_by_device_kind(kind, peak):
    assert observability.peak_flops_per_device(kind, "tpu") == peak


def test_peak_override_and_unknown_accelerator():
    assert observability.peak_flops_per_device("TPU v4", "tpu", override=1e12) == 1e12
    with pytest.raises(UserError, match="peak_flops_per_device.override"):
        observability.peak_flops_per_device("Some NPU", "npu")


def test_no_mfu_on_cpu_unless_its_peak_is_given():
    """A CPU has no datasheet peak, and a matmul timed at start-up reads low on a busy machine (MFU
    82-95% was printed on a 2-core CPU): without peak_flops_per_device.override there is no MFU."""
    cpu = SimpleNamespace(device_kind="cpu", platform="cpu", process_index=0)
    assert observability.peak_flops_per_device("cpu", "cpu") is None
    assert observability.total_peak_flops([cpu] * 8) is None
    timer = observability.IntervalTimer(step_flops=1e9, peak_flops=None, clock=iter([0.0, 1.0, 1.0]).__next__)
    timer.add_step(real_tokens=10, all_tokens=10)
    rates = timer.metrics(jax.devices()[0])
    assert "mfu" not in rates and rates["steps_per_s"] == 1.0
    line = summaries.progress_line(1, 10, {"loss": 1.0, "accuracy": 0.5, "learning_rate": 1e-3}, rates, eta_s=9)
    assert "MFU" not in line and line.endswith("| ETA 9s")
    tpus = [SimpleNamespace(device_kind="TPU v4", platform="tpu", process_index=i // 4) for i in range(8)]
    assert observability.total_peak_flops(tpus) == 8 * 275e12
    # Given through gin, the peak counts once per process: 8 virtual CPU devices share its cores.
    gin.bind_parameter("peak_flops_per_device.override", 2e11)  # conftest's clean_gin clears it
    assert observability.total_peak_flops([cpu] * 8) == 2e11


def test_progress_line_shows_mfu_when_known():
    rates = {"steps_per_s": 2.0, "tokens_per_s": 1e4, "real_tokens_per_s": 8e3, "mfu": 0.412}
    line = summaries.progress_line(100, 1000, {"loss": 4.321, "accuracy": 0.231, "learning_rate": 1e-2}, rates, 390)
    assert line == ("step  100/1000 | loss 4.3210 | acc 0.231 | lr 1.00e-02 | 2.00 steps/s | 10.0k tok/s (8.0k real) | "
                    "MFU 41.2% | ETA 6m30s")


@pytest.mark.parametrize("spec,expected", [(None, None), ("", None), ("3:5", (3, 5)), ("4:4", (4, 4))])
def test_profile_steps_parse(spec, expected):
    assert observability.parse_profile_steps(spec) == expected


@pytest.mark.parametrize("spec", ["5", "a:b", "0:2", "5:3", "3:"])
def test_malformed_profile_steps_is_a_user_error(spec):
    with pytest.raises(UserError, match="FIRST:LAST"):
        observability.parse_profile_steps(spec)


def test_malformed_profile_flag_fails_before_training(tmp_path, capsys):
    code = train_lib.main(["--gin_file=gin/base.gin", f"--gin.MODEL_DIR='{tmp_path}'", "--profile_steps=7"])
    assert code == 2
    assert "--profile_steps='7'" in capsys.readouterr().err


@pytest.mark.slow
def test_training_logs_efficiency_metrics_and_writes_a_profile(tmp_path, capsys):
    model_dir = str(tmp_path / "run")
    code = train_lib.main([
        "--gin_file=gin/base.gin", "--gin_file=gin/models/t5_1_1_tiny.gin",
        "--gin.TASK_FEATURE_LENGTHS={'inputs': 64, 'targets': 16}", "--gin.BATCH_SIZE=8",
        f"--gin.MODEL_DIR='{model_dir}'", "--gin.TRAIN_STEPS=6", "--gin.LoopConfig.log_every=3",
        "--gin.EvalConfig.every=100", "--gin.EvalConfig.batches=1", "--profile_steps=2:3",
    ])
    out = capsys.readouterr().out
    assert code == 0
    with open(os.path.join(model_dir, "metrics.jsonl")) as f:
        train = [r for r in map(json.loads, f) if r["group"] == "train"]
    assert [r["step"] for r in train] == [3, 6]
    on_cpu = jax.devices()[0].platform == "cpu"  # no peak_flops_per_device.override: no MFU on CPU
    for r in train:
        assert ("mfu" not in r) if on_cpu else (0 < r["mfu"] <= 1), r
        assert r["data_wait_seconds"] >= 0 and r["step_seconds"] > r["data_wait_seconds"], r
        assert r["memory_bytes_in_use"] > 50e6, r  # at least the process's Python + jax
        assert r["tokens_per_s"] >= r["real_tokens_per_s"] > 0, r
    assert train[0]["compile_seconds"] > 0 and "compile_seconds" not in train[1]
    # The test run's shared compilation cache may already hold this train step (another test compiled it).
    assert ("MFU " not in out) if on_cpu else ("MFU " in out)
    assert re.search(r"(Compiled|Loaded) the train step (from the compilation cache )?in", out)
    assert glob.glob(os.path.join(model_dir, "profile", "**", "*.xplane.pb"), recursive=True)

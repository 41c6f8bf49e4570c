"""Sweeps: grid and random trial generation, commands, and a real two-trial sweep's table."""

import os

import pytest

from t5lite import sweep
from t5lite.errors import UserError

TINY = ["--gin_file=gin/base.gin", "--gin_file=gin/models/t5_1_1_tiny.gin"]


def test_grid_is_the_cartesian_product():
    trials = sweep.parse_grid(["make_schedule.learning_rate=[0.1, 0.3]", "BATCH_SIZE=[8, 16, 32]"])
    assert len(trials) == 6 and {"make_schedule.learning_rate": 0.3, "BATCH_SIZE": 16} in trials
    with pytest.raises(UserError, match="list literal"):
        sweep.parse_grid(["x=[1,"])


def test_random_search_is_seeded_and_within_bounds():
    specs = ["lr=loguniform(0.01, 1.0)", "name=choice(['a', 'b'])"]
    trials = sweep.sample_random(specs, 20, seed=3)
    assert trials == sweep.sample_random(specs, 20, seed=3)
    assert all(0.01 <= t["lr"] <= 1.0 and t["name"] in ("a", "b") for t in trials)


def test_print_commands_gives_one_command_per_trial(tmp_path, capsys):
    assert sweep.main([*TINY, f"--sweep_dir={tmp_path}", "--grid=TrainConfig.seed=[1, 2]", "--metric=t/loss",
                       "--print_commands"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and "--gin.TrainConfig.seed=2" in lines[1] and "trial_001" in lines[1]


@pytest.mark.slow
def test_two_trial_sweep_writes_its_table(tmp_path, capsys):
    metric = "wikitext2_span_corruption/loss"
    args = [*TINY, f"--sweep_dir={tmp_path}", "--grid=make_schedule.learning_rate=[0.03, 0.3]", f"--metric={metric}",
            "--gin=TRAIN_STEPS=10", "--gin=BATCH_SIZE=8", "--gin=TASK_FEATURE_LENGTHS={'inputs': 64, 'targets': 16}",
            "--gin=EvalConfig.every=10", "--gin=EvalConfig.batches=1"]
    assert sweep.main(args) == 0
    rows = (tmp_path / "results.tsv").read_text().strip().splitlines()
    assert rows[0] == f"trial\tmake_schedule.learning_rate\t{metric}"
    assert sorted(r.split("\t")[0] for r in rows[1:]) == ["trial_000", "trial_001"]
    values = [float(r.split("\t")[2]) for r in rows[1:]]
    assert values == sorted(values)  # best (lowest loss) first
    # A second invocation reads the finished trials instead of training again.
    capsys.readouterr()
    assert sweep.main(args) == 0
    assert "[sweep] trial" not in capsys.readouterr().out
    assert os.path.exists(tmp_path / "trial_000" / "eval_results.json")

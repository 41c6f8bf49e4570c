"""Sweeps: search spaces, k-fold splits, the Optuna study (pruning, resuming, cross-validation) and a
real two-worker Bayesian sweep of tiny models.

Most sweeps here run a stand-in for `python -m t5lite.train` (FAKE_TRAIN: it writes the metrics.jsonl
rows and eval_results.json a run writes, in a fraction of a second), so they test the sweep's logic in
seconds; the slow test runs the real trainer.
"""

import csv
import os
import shlex
import socket
import subprocess
import sys

import numpy as np
import optuna
import pytest

from t5lite import sweep
from t5lite.data import splits
from t5lite.errors import UserError
from t5lite.tuning import space, study, trials

TINY = ["--gin_file=gin/base.gin", "--gin_file=gin/models/t5_1_1_tiny.gin"]

# Eval loss x + fold at every step (x: the swept binding, fold: k of DataConfig.split 'train[fold=k/K]').
FAKE_TRAIN = """
import ast, json, os, sys, time
gin = dict(a[len("--gin."):].split("=", 1) for a in sys.argv[1:] if a.startswith("--gin."))
model_dir = ast.literal_eval(gin["MODEL_DIR"])
split = ast.literal_eval(gin.get("DataConfig.split", "'train'"))
value = float(gin.get("x", "0")) + (int(split.split("fold=")[1].split("/")[0]) if "fold=" in split else 0)
os.makedirs(model_dir, exist_ok=True)
for step in (1, 2, 3):
    time.sleep(0.2)
    with open(os.path.join(model_dir, "metrics.jsonl"), "a") as f:
        f.write(json.dumps({"group": "train", "step": step, "loss": 1.0}) + "\\n")
        f.write(json.dumps({"group": "eval/t", "step": step, "loss": value, "accuracy": 0.5}) + "\\n")
with open(os.path.join(model_dir, "eval_results.json"), "w") as f:
    json.dump({"step": 3, "tasks": {"t": {"loss": value}}}, f)
"""


@pytest.fixture
def fake_train(tmp_path, monkeypatch):
    script = tmp_path / "fake_train.py"
    script.write_text(FAKE_TRAIN)
    monkeypatch.setattr(trials, "TRAIN_PROGRAM", (str(script),))
    monkeypatch.setattr(trials, "POLL_SECONDS", 0.05)
    return tmp_path / "sweep"


def _rows(sweep_dir):
    with open(os.path.join(sweep_dir, "results.csv")) as f:
        return {int(r["trial"]): r for r in csv.DictReader(f)}


def _study(sweep_dir):
    storage = optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(os.path.join(sweep_dir, study.JOURNAL)))
    return optuna.load_study(study_name=study.STUDY_NAME, storage=storage)


# --- Search spaces -----------------------------------------------------------------------------------

def test_grid_is_the_cartesian_product_of_gin_values():
    params = space.parse_grid(["make_schedule.learning_rate=[0.1, 0.3]", "TASK_FEATURE_LENGTHS=[{'inputs': 8}, "
                                                                        "{'inputs': 16}]", "name=['a', 'b', 'c']"])
    points = space.grid_points(params)
    assert len(points) == 12 and points[0] == {"make_schedule.learning_rate": "0.1",
                                               "TASK_FEATURE_LENGTHS": "{'inputs': 8}", "name": "'a'"}
    with pytest.raises(UserError, match="list literal"):
        space.parse_grid(["x=[1,"])


def test_distributions_parse_and_random_samples_are_seeded_within_bounds():
    params = space.parse_distributions(["lr=loguniform(0.01, 1.0)", "warmup=int(0, 10)", "name=choice(['a', 'b'])"],
                                       "--random")
    samples = space.sample_random(params, 20, seed=3)
    assert samples == space.sample_random(params, 20, seed=3)
    assert samples[:5] == space.sample_random(params, 5, seed=3)  # raising --trials extends the same list
    assert all(0.01 <= s["lr"] <= 1.0 and 0 <= s["warmup"] <= 10 and s["name"] in ("'a'", "'b'") for s in samples)
    assert isinstance(samples[0]["warmup"], int)
    for bad, message in (("lr=loguniform(0, 1)", "0 < low"), ("lr=normal(0, 1)", "use uniform"),
                         ("n=int(0.5, 2)", "two ints"), ("lr=uniform(2, 1)", "below high")):
        with pytest.raises(UserError, match=message):
            space.parse_distributions([bad], "--bayes")


# --- k-fold splits -----------------------------------------------------------------------------------

def test_kfold_splits_are_disjoint_cover_the_data_and_follow_the_seed():
    folds = splits.kfold(103, 5, seed=1)
    assert sorted(np.concatenate(folds).tolist()) == list(range(103))  # disjoint and covering
    assert {len(f) for f in folds} == {20, 21}
    assert all(np.array_equal(a, b) for a, b in zip(folds, splits.kfold(103, 5, seed=1), strict=True))
    assert not np.array_equal(folds[0], splits.kfold(103, 5, seed=2)[0])
    train = splits.FoldSplit("train", 2, 5, seed=1).rows(103)
    heldout = splits.FoldSplit("train", 2, 5, seed=1, heldout=True).rows(103)
    assert not set(train) & set(heldout) and len(train) + len(heldout) == 103
    with pytest.raises(UserError, match="non-empty folds"):
        splits.kfold(3, 5)


def test_stratified_folds_keep_the_label_ratios():
    labels = ["neg"] * 30 + ["pos"] * 70
    for fold in splits.kfold(100, 5, seed=0, labels=labels):
        assert sum(labels[i] == "neg" for i in fold) == 6 and len(fold) == 20
    unstratified = [sum(labels[i] == "neg" for i in f) for f in splits.kfold(100, 5, seed=0)]
    assert unstratified != [6] * 5  # what stratification is for


def test_fold_split_names_parse_and_are_accepted_where_their_base_split_is():
    name = "train[fold=2/5,seed=7,stratified,heldout]"
    assert str(splits.FoldSplit.parse(name)) == name
    assert splits.FoldSplit.parse("validation") is None
    for bad in ("train[fold=5/5]", "train[fold=1/5,shuffled]", "train[2/5]"):
        with pytest.raises(UserError):
            splits.FoldSplit.parse(bad)
    names = splits.FoldSplits(("train", "validation"))
    assert "train[fold=0/3]" in names and "test[fold=0/3]" not in names and "train[oops]" not in names


def test_a_supervised_task_reads_its_folds(tmp_path, monkeypatch):
    import seqio

    from t5lite.data import pipeline

    (tmp_path / "sst2").mkdir()
    rows = [(f"sentence {i}", int(i % 4 != 0)) for i in range(40)]  # a quarter negative
    (tmp_path / "sst2" / "train.tsv").write_text("sentence\tlabel\n" + "".join(f"{s}\t{y}\n" for s, y in rows))
    monkeypatch.setenv("T5LITE_DATA_DIR", str(tmp_path))
    source = seqio.get_mixture_or_task("sst2").source

    def read(split):
        return [r["inputs"].decode() for r in source.get_dataset(split=split, shuffle=False).as_numpy_iterator()]

    heldout = [read(f"train[fold={k}/4,stratified,heldout]") for k in range(4)]
    assert sorted(sum(heldout, [])) == sorted(f"sst2 sentence: {s}" for s, _ in rows)
    assert [len(h) for h in heldout] == [10] * 4
    assert sorted(sum(int(s.split()[-1]) % 4 == 0 for s in h) for h in heldout) == [2, 2, 3, 3]  # 10 negatives
    assert not set(read("train[fold=1/4,stratified]")) & set(heldout[1])
    batch = next(pipeline.get_batches("sst2", split="train[fold=1/4]", task_feature_lengths={"inputs": 16,
                                      "targets": 4}, model_type="encoder_decoder", batch_size=4, shuffle=True, seed=0))
    assert batch["encoder_input_tokens"].shape == (4, 16)


# --- Sweeps of the stand-in trainer ------------------------------------------------------------------

def test_print_commands_gives_one_command_per_worker(tmp_path, capsys):
    assert sweep.main([*TINY, f"--sweep_dir={tmp_path}", "--bayes=TrainConfig.seed=int(0, 9)", "--metric=t/loss",
                       "--workers=3", "--print_commands"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 3 and lines[2].startswith("python -m t5lite.sweep ") and "--worker=2" in lines[2]
    assert "'--bayes=TrainConfig.seed=int(0, 9)'" in lines[0] and not os.path.exists(tmp_path / study.JOURNAL)


def test_a_sweep_resumes_and_extends_without_rerunning_trials(fake_train, capsys):
    args = [f"--sweep_dir={fake_train}", "--random=x=uniform(0, 10)", "--metric=t/loss", "--trials=2"]
    assert sweep.main(args) == 0
    rows = _rows(fake_train)
    assert [rows[n]["state"] for n in (0, 1)] == ["complete", "complete"] and rows[0]["steps"] == "3"
    assert float(rows[0]["t/loss"]) == pytest.approx(float(rows[0]["x"]))
    assert (fake_train / "results.png").stat().st_size > 0 and "| trial | x | t/loss |" in capsys.readouterr().out
    assert sweep.main(args) == 0  # the same command again: nothing to run
    assert "x=" not in capsys.readouterr().out
    assert sweep.main([*args[:-1], "--trials=3"]) == 0  # the study goes on: one more trial
    out = capsys.readouterr().out
    assert "trial 2: x=" in out and "trial 0: x=" not in out and len(_rows(fake_train)) == 3
    assert sweep.main([*args[:-1], "--mode=max"]) == 2  # another sweep's flags on this study
    assert "holds the study of another sweep" in capsys.readouterr().err


def test_a_bad_trial_is_pruned_and_recorded_as_pruned(fake_train):
    assert sweep.main([f"--sweep_dir={fake_train}", "--grid=x=[1, 9, 0.5]", "--metric=t/loss", "--pruner=median",
                       "--startup_trials=1"]) == 0
    rows = _rows(fake_train)
    assert [rows[n]["state"] for n in (0, 1, 2)] == ["complete", "pruned", "complete"]
    assert rows[1]["steps"] == "1"  # stopped at its first evaluation, worse than trial 0's
    assert list(rows)[0] == 2  # best first
    assert _study(fake_train).trials[1].intermediate_values == {1: 9.0}


def test_an_interrupted_trial_runs_again_in_its_directory(fake_train):
    args = [f"--sweep_dir={fake_train}", "--grid=x=[1, 2]", "--metric=t/loss"]
    parsed = sweep.build_parser().parse_args(args)
    the_study = study.open_study(sweep.build_sweep(parsed))
    trial = the_study.ask()  # trial 0, claimed by a worker that has died since
    trial.suggest_categorical("x", ["1", "2"])
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    trial.set_user_attr("worker", f"{socket.gethostname()}:{dead.pid}:gone")
    trial.set_user_attr("model_dir", "trial_000")
    assert sweep.main(args) == 0
    rows = _rows(fake_train)
    assert rows[0]["state"] == "interrupted" and rows[2]["state"] == "complete" and rows[2]["x"] == rows[0]["x"]
    assert _study(fake_train).trials[2].user_attrs["model_dir"] == "trial_000"  # continues the same run
    assert sorted(r["state"] for r in rows.values()) == ["complete", "complete", "interrupted"]


def test_cross_validation_reports_the_mean_and_std_over_folds(fake_train):
    assert sweep.main([f"--sweep_dir={fake_train}", "--grid=x=[1]", "--metric=t/loss", "--cv_folds=2"]) == 0
    row = _rows(fake_train)[0]
    assert float(row["t/loss"]) == 1.5 and float(row["t/loss std"]) == 0.5 and row["fold values"] == "1 2"
    assert row["steps"] == "6"  # the folds' steps count on
    commands = [shlex.split(line[2:]) for line in (fake_train / "trial_000.log").read_text().splitlines()]
    assert "--gin.DataConfig.split='train[fold=1/2]'" in commands[1]
    assert "--gin.EvalConfig.split='train[fold=1/2,heldout]'" in commands[1]
    assert os.path.exists(fake_train / "trial_000" / "fold_1" / "eval_results.json")


def test_a_metric_the_runs_do_not_evaluate_is_named_with_those_they_do(fake_train, capsys):
    assert sweep.main([f"--sweep_dir={fake_train}", "--grid=x=[1]", "--metric=t/accuracy"]) == 2
    assert "t/token_accuracy" in capsys.readouterr().err  # a teacher-forced accuracy is token accuracy


# --- The real trainer --------------------------------------------------------------------------------

@pytest.mark.slow
def test_a_bayesian_sweep_on_two_workers_completes_and_resumes(tmp_path, capfd):
    metric = "wikitext2_span_corruption/loss"
    args = [*TINY, f"--sweep_dir={tmp_path}", "--bayes=make_schedule.learning_rate=loguniform(0.01, 1.0)",
            "--trials=2", f"--metric={metric}", "--gin=TRAIN_STEPS=6", "--gin=BATCH_SIZE=4",
            "--gin=TASK_FEATURE_LENGTHS={'inputs': 32, 'targets': 8}", "--gin=EvalConfig.every=3",
            "--gin=EvalConfig.batches=1", "--gin=CheckpointConfig.every=6"]
    assert sweep.main([*args, "--workers=2"]) == 0
    rows = _rows(tmp_path)
    assert sorted(rows) == [0, 1] and all(r["state"] == "complete" and r["steps"] == "6" for r in rows.values())
    values = [float(r[metric]) for r in rows.values()]
    assert values == sorted(values) and all(0 < v < 20 for v in values)  # best first
    assert {t.number: sorted(t.intermediate_values) for t in _study(tmp_path).trials} == {0: [3, 6], 1: [3, 6]}
    out = capfd.readouterr().out
    assert "[sweep worker 0] trial" in out and "[sweep worker 1] trial" in out  # two trials at once
    assert sweep.main(args) == 0  # the same sweep again: nothing is trained, the study is the same
    assert "learning_rate=" not in capfd.readouterr().out.split("| trial |")[0]
    assert len(_study(tmp_path).trials) == 2

"""python -m t5lite.eval end to end on toy seqio tasks: metrics, rank classification, --watch, errors."""

import json
import os
import threading
import time

import gin
import jax
import pytest
import seqio
import tensorflow as tf

from t5lite import checkpoints, gin_cli, partitioning, trainer
from t5lite import eval as eval_lib
from t5lite import train as train_lib
from t5lite.data import metrics
from t5lite.data.vocab import get_default_vocabulary
from t5lite.errors import UserError
from t5lite.evaluation import EarlyStopping, TrainingEvaluator
from t5lite.model.config import TransformerConfig
from t5lite.model.models import Model
from t5lite.optim import make_optimizer
from t5lite.run_config import EvalConfig

LENGTHS = {"inputs": 32, "targets": 16}
WORDS = ["apple", "river", "stone", "cloud", "green", "north", "light", "table", "music", "paper"]
SHORT_CHOICES = ["yes", "no", "ok", "up"]


def _copy_examples(split):
    texts = [f"{a} {b}" for a in WORDS for b in WORDS[:4]]
    return tf.data.Dataset.from_tensor_slices({"inputs": [f"copy: {t}" for t in texts], "targets": texts})


def _choice_rows(split):
    """12 questions, two choices each: a short one (correct) and a long one."""
    rows = {"inputs": [], "targets": [], "question_id": [], "is_correct": []}
    for q in range(12):
        long_choice = f"the {WORDS[q % 10]} and the {WORDS[(q + 3) % 10]} went over the {WORDS[(q + 5) % 10]}"
        for choice, correct in ((SHORT_CHOICES[q % 4], 1), (long_choice, 0)):
            rows["inputs"].append(f"question {q}: pick one")
            rows["targets"].append(choice)
            rows["question_id"].append(q)
            rows["is_correct"].append(correct)
    return tf.data.Dataset.from_tensor_slices(rows)


def _register(name, dataset_fn, metric_fns, postprocess_fn=None):
    if name in seqio.TaskRegistry.names():
        return
    vocabulary = get_default_vocabulary()
    seqio.TaskRegistry.add(
        name,
        source=seqio.FunctionDataSource(lambda split, shuffle_files, seed=None: dataset_fn(split),
                                        splits=["validation"]),
        output_features={k: seqio.Feature(vocabulary, add_eos=True) for k in ("inputs", "targets")},
        preprocessors=[seqio.preprocessors.tokenize, seqio.preprocessors.append_eos_after_trim],
        postprocess_fn=postprocess_fn,
        metric_fns=metric_fns,
    )


_register("t5lite_test_copy", _copy_examples, [metrics.accuracy, metrics.bits_per_byte])
_register("t5lite_test_choice", _choice_rows, [metrics.rank_classification],
          postprocess_fn=metrics.rank_classification_target)
_register("t5lite_test_no_metrics", _copy_examples, [])
if "t5lite_test_eval" not in seqio.MixtureRegistry.names():
    seqio.MixtureRegistry.add("t5lite_test_eval", ["t5lite_test_copy", "t5lite_test_choice",
                                                   "t5lite_test_no_metrics"], default_rate=1.0)


def _gin_args(model_dir, *extra):
    return ["--gin_file=gin/runs/eval.gin", "--gin_file=gin/models/t5_1_1_tiny.gin",
            f"--gin.MODEL_DIR='{model_dir}'", "--gin.MIXTURE_OR_TASK_NAME='t5lite_test_eval'",
            f"--gin.TASK_FEATURE_LENGTHS={LENGTHS}", "--gin.evaluate.batch_size=4",
            "--gin.evaluate.loss_batches=1", *extra]


def _save_random_checkpoint(model_dir, step, seed, *extra_bindings):
    """A freshly initialised train state of the gin-configured model, saved as a checkpoint."""
    gin.clear_config()
    args, bindings = gin_cli.parse_args(_gin_args(model_dir, *extra_bindings), description="")
    gin_cli.parse_gin(args.gin_file, bindings)
    model = Model(TransformerConfig())
    mesh = partitioning.make_mesh()
    init = trainer.make_sharded_init(model, make_optimizer().tx, model.input_shapes(4, LENGTHS), mesh,
                                     partitioning.axis_rules("dp"))
    ckpt = checkpoints.Checkpointer(os.path.join(model_dir, "checkpoints"), save_every=1, keep=None)
    ckpt.save(step, init.init_fn(jax.random.PRNGKey(seed)), force=True)
    ckpt.wait()
    ckpt.close()
    gin.clear_config()


def _results(model_dir, step):
    with open(os.path.join(model_dir, "eval", f"step_{step}.json")) as f:
        return json.load(f)["tasks"]


@pytest.mark.slow
def test_eval_reports_loss_and_metrics_and_rank_classification_picks_the_known_answer(tmp_path, capsys):
    model_dir = str(tmp_path / "run")
    _save_random_checkpoint(model_dir, 1, seed=0)
    assert eval_lib.main(_gin_args(model_dir)) == 0
    out = capsys.readouterr().out
    assert "task 't5lite_test_no_metrics' has no metric functions" in out
    results = _results(model_dir, 1)
    assert set(results) == {"t5lite_test_copy", "t5lite_test_choice", "t5lite_test_no_metrics"}
    assert {"loss", "perplexity", "token_accuracy", "accuracy", "bits_per_byte"} <= set(results["t5lite_test_copy"])
    assert results["t5lite_test_copy"]["accuracy"] == 0.0  # an untrained model copies nothing
    assert results["t5lite_test_copy"]["bits_per_byte"] > 1.0  # an untrained model: several bits per byte
    assert set(results["t5lite_test_no_metrics"]) >= {"loss", "perplexity"}
    # An untrained model spreads probability ~uniformly over 8192 ids, so a choice's log-likelihood
    # falls with its token count: by plain likelihood the short choice (correct here) always wins;
    # per byte the long one does.
    assert results["t5lite_test_choice"]["accuracy"] == 100.0
    assert results["t5lite_test_choice"]["length_normalized_accuracy"] == 0.0
    assert os.path.isdir(os.path.join(model_dir, "eval", "tensorboard", "t5lite_test_copy"))


@pytest.mark.slow
@pytest.mark.parametrize("model_gin,mixture", [("t5_1_1_tiny", "zero_shot"),
                                               ("decoder_only_tiny", "zero_shot_prefix_lm")])
def test_eval_scores_arc_and_lambada_from_the_data_dir(tmp_path, data_dir, model_gin, mixture):
    """The decoder-only model is a causal LM (evaluate.prefix_lm=False): scored without a bidirectional prompt.
    data_dir (conftest.py) sets $T5LITE_DATA_DIR: the full data sets if given, else the shipped excerpts."""
    model_dir = str(tmp_path / "run")
    extra = [f"--gin_file=gin/models/{model_gin}.gin", f"--gin.MIXTURE_OR_TASK_NAME='{mixture}'",
             "--gin.evaluate.eval_split='test'", "--gin.evaluate.num_examples=8"]
    _save_random_checkpoint(model_dir, 1, 0, *extra)
    assert eval_lib.main(_gin_args(model_dir, *extra)) == 0
    suffix = mixture[len("zero_shot"):]
    results = _results(model_dir, 1)
    assert set(results) == {f"arc_easy{suffix}", f"arc_challenge{suffix}", f"lambada{suffix}"}
    for arc in ("arc_easy", "arc_challenge"):
        arc_results = results[f"{arc}{suffix}"]
        # 8 rows are the first 2 questions' 4 choices each: accuracy 0, 50 or 100 against chance 25.
        assert arc_results["chance_accuracy"] == 25.0
        assert arc_results["accuracy"] in (0.0, 50.0, 100.0) and "length_normalized_accuracy" in arc_results
        assert arc_results["loss"] > 0
    lambada = results[f"lambada{suffix}"]
    assert 0.0 <= lambada["last_word_accuracy"] <= 100.0
    # Near-uniform over 8192 ids, a word of one or more tokens has log p <= about -log(8192).
    assert lambada["target_perplexity"] > 1000


@pytest.mark.slow
def test_watch_evaluates_each_new_checkpoint(tmp_path):
    model_dir = str(tmp_path / "run")
    _save_random_checkpoint(model_dir, 1, seed=0)
    args, bindings = gin_cli.parse_args(_gin_args(model_dir, "--gin.evaluate.watch_interval_s=0.2",
                                                  "--gin.evaluate.watch_timeout_s=5.0",
                                                  "--gin.evaluate.num_examples=4"), description="")
    gin_cli.parse_gin(args.gin_file, bindings)
    results = {}
    watcher = threading.Thread(target=lambda: results.update(eval_lib.evaluate(watch=True)))
    watcher.start()
    deadline = time.monotonic() + 120
    while not os.path.exists(os.path.join(model_dir, "eval", "step_1.json")) and time.monotonic() < deadline:
        time.sleep(0.2)
    _save_random_checkpoint(model_dir, 2, seed=1)  # a new checkpoint appears while watching
    watcher.join(timeout=180)
    assert not watcher.is_alive()
    assert sorted(results) == [1, 2]
    assert _results(model_dir, 1)["t5lite_test_copy"]["loss"] != _results(model_dir, 2)["t5lite_test_copy"]["loss"]


def test_checkpoint_of_another_model_is_a_user_error(tmp_path, capsys):
    model_dir = str(tmp_path / "run")
    _save_random_checkpoint(model_dir, 1, 0, "--gin.TransformerConfig.emb_dim=32",
                            "--gin.TransformerConfig.num_decoder_layers=1")
    assert eval_lib.main(_gin_args(model_dir)) == 2
    assert "cannot be restored into the configured model" in capsys.readouterr().err


def test_missing_checkpoint_path_is_a_user_error(tmp_path, capsys):
    assert eval_lib.main(_gin_args(str(tmp_path / "nowhere"))) == 2
    assert "does not exist" in capsys.readouterr().err


def test_early_stopping_waits_patience_evaluations_without_improvement():
    stopper = EarlyStopping("task/loss", patience=2, mode="min")
    decisions = [stopper.should_stop({"task": {"loss": v}}) for v in (3.0, 2.0, 2.5, 1.9, 2.0, 1.95)]
    assert decisions == [False, False, False, False, False, True]
    assert stopper.best == 1.9
    assert not stopper.should_stop({"other_task": {"loss": 0.0}})  # an evaluation without the metric
    maximize = EarlyStopping("task/accuracy", patience=1, mode="max")
    assert [maximize.should_stop({"task": {"accuracy": v}}) for v in (50.0, 60.0, 60.0)] == [False, False, True]
    with pytest.raises(UserError, match="mode"):
        EarlyStopping("task/loss", mode="lowest")
    with pytest.raises(UserError, match="task_name/metric_name"):
        EarlyStopping("loss")
    with pytest.raises(UserError, match="no evaluated task 'tsak'"):
        EarlyStopping("tsak/loss").check_metric_exists(["task"])


@pytest.mark.slow
def test_training_runs_inference_eval_every_n_steps_and_stops_early(tmp_path, capsys):
    model_dir = str(tmp_path / "run")
    args = ["--gin_file=gin/base.gin", "--gin_file=gin/models/t5_1_1_tiny.gin", f"--gin.MODEL_DIR='{model_dir}'",
            "--gin.TASK_FEATURE_LENGTHS={'inputs': 64, 'targets': 16}", "--gin.BATCH_SIZE=4", "--gin.TRAIN_STEPS=40",
            "--gin.EvalConfig.mixture_or_task_name='t5lite_test_copy'", "--gin.EvalConfig.batches=1",
            "--gin.EvalConfig.every=100", "--gin.CheckpointConfig.every=100",
            "--gin.EvalConfig.infer_every=5", "--gin.EvalConfig.infer_examples=4",
            "--gin.EvalConfig.early_stopping_metric='t5lite_test_copy/accuracy'",
            "--gin.EvalConfig.early_stopping_mode='max'",
            "--gin.EvalConfig.early_stopping_patience=1"]
    assert train_lib.main(args) == 0
    out = capsys.readouterr().out
    # An untrained model copies nothing: accuracy 0 at step 5 and again at 10 -> stop at 10.
    assert "infer eval t5lite_test_copy: accuracy 0.000" in out
    assert "early stopping at step 10" in out
    with open(os.path.join(model_dir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    inferred = [r for r in records if r["group"] == "infer_eval/t5lite_test_copy"]
    assert [r["step"] for r in inferred] == [5, 10]
    assert checkpoints.checkpoint_steps(os.path.join(model_dir, "checkpoints")) == [10]


def test_inference_eval_runs_every_n_steps_and_at_the_last_step():
    """A run of 7 steps with infer_every=5 decodes at 5 and 7: it ends with its configured metrics (a
    sweep's --metric=task/accuracy reads them there), and teacher-forced eval keeps its own schedule."""
    class Decoder:  # the InferenceEvaluator's interface: its task names and evaluate(params, step)
        task_names = ["copy"]
        steps = []

        def evaluate(self, params, step):
            self.steps.append(step)
            return {"copy": {"accuracy": 50.0}}

    evaluator = object.__new__(TrainingEvaluator)  # no model: what is tested is when each eval is due
    evaluator.config, evaluator.last_step = EvalConfig(every=3, infer_every=5), 7
    evaluator.inference, evaluator.early_stopping = Decoder(), None
    evaluator.write_metrics, evaluator.verbose = (lambda group, step, metrics: None), False
    teacher_forced_steps = []
    evaluator.evaluate = lambda step, params: teacher_forced_steps.append(step) or {"copy": {"loss": 1.0}}
    for step in range(1, 8):
        evaluator.after_step(step, params={}, model_params=lambda p: p)
    assert Decoder.steps == [5, 7] and teacher_forced_steps == [3, 6, 7]

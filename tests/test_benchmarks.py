"""The benchmark tasks (t5lite/data/benchmarks.py, zero_shot.py): loaders on the excerpts, and every prompt and
continuation equal to the request lm-evaluation-harness builds from its own task YAML for the same item (the
harness reads the same rows, converted to its data set's schema, from local files: no download)."""

import bz2
import csv
import json
import os

import gin
import pytest
import seqio

from t5lite.data import benchmarks, metrics, zero_shot
from t5lite.data import multiple_choice as mc

pytestmark = pytest.mark.usefixtures("data_dir")

HELLASWAG_FIRST = {  # HellaSwag validation item 0 as the harness reads it (HF Rowan/hellaswag, ind 24)
    "activity_label": "Roof shingle removal", "ctx_a": "A man is sitting on a roof.", "ctx_b": "he",
    "endings": ["is using wrap to wrap a pair of skis.", "is ripping level tiles off.",
                "is holding a rubik's cube.", "starts pulling up roofing on a roof."], "label": "3"}


def _rows(task):
    return mc.rows(benchmarks.BENCHMARKS[task][0]("test")) if task in benchmarks.BENCHMARKS else None


def _harness_requests(tmp_path, yaml_path, docs, split, num_fewshot=0, fewshot_docs=None):
    """[(context, continuation)] per choice of every doc, built by the harness's own task from `docs`."""
    pytest.importorskip("lm_eval")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    import lm_eval.tasks
    from lm_eval.api.task import ConfigurableTask
    from lm_eval.tasks._yaml_loader import load_yaml

    files = {}
    for name, rows in ((split, docs), ("dev", fewshot_docs)):
        if rows is not None:
            files[name] = str(tmp_path / f"{os.path.basename(yaml_path)}.{name}.jsonl")
            with open(files[name], "w", encoding="utf-8") as f:
                f.writelines(json.dumps(d) + "\n" for d in rows)
    config = load_yaml(os.path.join(os.path.dirname(lm_eval.tasks.__file__), yaml_path))
    config.update(dataset_path="json", dataset_name=None, dataset_kwargs={"data_files": files},
                  training_split=None, validation_split=split if split == "validation" else None,
                  test_split=split if split == "test" else None)
    if fewshot_docs is not None:
        config["fewshot_split"] = "dev"
    task = ConfigurableTask(config=config)
    out = []
    for i, doc in enumerate(task.test_docs() if split == "test" else task.validation_docs()):
        context = task.fewshot_context(doc, num_fewshot=num_fewshot)
        out.extend(r.arguments for r in task.construct_requests(doc, context, metadata=("t", i, 0)))
    return out


def _ours(rows):
    return [(r["inputs"], r["targets"]) for r in rows]


def test_arc_requests_equal_the_harness(data_dir, tmp_path):
    rows = mc.rows(zero_shot.arc_questions("arc_easy.jsonl", "test"))
    docs = []
    for line in open(data_dir.path("arc", "arc_easy.jsonl"), encoding="utf-8"):
        row = json.loads(line)
        labels = "ABCDE"[:len(row["choices"])]
        docs.append({"question": row["query"].removeprefix("Question: "),
                     "choices": {"text": row["choices"], "label": list(labels)}, "answerKey": labels[row["gold"]]})
    docs = docs[:50]
    assert _ours(rows)[:len(_harness_requests(tmp_path, "arc/arc_easy.yaml", docs, "test"))] == \
        _harness_requests(tmp_path, "arc/arc_easy.yaml", docs, "test")


def _mmlu_docs(data_dir, split, subject):
    with open(data_dir.path("mmlu", split, f"{subject}_{split}.csv"), encoding="utf-8", newline="") as f:
        return [{"question": r[0], "subject": subject, "choices": r[1:5], "answer": "ABCD".index(r[5])}
                for r in csv.reader(f)]


@pytest.mark.parametrize("num_fewshot", [0, 5])
def test_mmlu_requests_equal_the_harness_zero_and_five_shot(data_dir, tmp_path, num_fewshot):
    gin.bind_parameter("benchmarks.num_fewshot", num_fewshot)
    ours = _rows("mmlu")
    for subject in ("abstract_algebra", "high_school_european_history", "world_religions"):
        docs = _mmlu_docs(data_dir, "test", subject)[:5]
        expected = _harness_requests(tmp_path, f"mmlu/default/mmlu_{subject}.yaml", docs, "test", num_fewshot,
                                     fewshot_docs=_mmlu_docs(data_dir, "dev", subject))
        mine = [r for r in ours if r["category"].endswith("/" + subject)][:len(expected)]
        assert _ours(mine) == expected
    categories = {r["category"].split("/")[0] for r in ours}
    assert categories == {"stem", "humanities", "social_sciences", "other"}
    assert len({r["category"] for r in ours}) == 57


def test_mmlu_rows_and_subjects_match_the_data(data_dir):
    questions = benchmarks.mmlu_questions("test")
    assert len(questions) == (14042 if data_dir.full else 57 * 5)
    assert all(q.choices == ("A", "B", "C", "D") and sum(q.labels) == 1 for q in questions)


@pytest.mark.parametrize("targets", ["mc1", "mc2"])
def test_truthfulqa_requests_equal_the_harness(data_dir, tmp_path, targets):
    with open(data_dir.path("truthfulqa", "v0", "mc_task.json"), encoding="utf-8") as f:
        items = json.load(f)[:30]
    docs = [{"question": it["question"],
             **{f"{t}_targets": {"choices": list(it[f"{t}_targets"]), "labels": list(it[f"{t}_targets"].values())}
                for t in ("mc1", "mc2")}} for it in items]
    expected = _harness_requests(tmp_path, f"truthfulqa/truthfulqa_{targets}.yaml", docs, "validation")
    assert _ours(_rows(f"truthfulqa_{targets}"))[:len(expected)] == expected
    assert len(benchmarks.truthfulqa_questions("mc1_targets", "test")) == data_dir.rows(
        "truthfulqa/v0/mc_task.json", full=817)


def test_winogrande_partial_scoring_equals_the_harness(data_dir, tmp_path):
    docs = []
    for line in open(data_dir.path("winogrande", "winogrande.jsonl"), encoding="utf-8"):
        row = json.loads(line)
        first, second = row["context_options"]
        prefix = os.path.commonprefix([first, second])
        docs.append({"sentence": f"{prefix}_ {row['continuation']}", "option1": first[len(prefix):],
                     "option2": second[len(prefix):], "answer": str(row["gold"] + 1)})
    expected = _harness_requests(tmp_path, "winogrande/default.yaml", docs, "validation")
    ours = _rows("winogrande")
    assert _ours(ours) == expected
    assert len(ours) == 2 * data_dir.rows("winogrande/winogrande.jsonl", full=1267)
    # acc_norm would divide by the length of the harness's choices: the partial sentences.
    assert ours[0]["choice_length"] == len(json.loads(open(data_dir.path("winogrande", "winogrande.jsonl")).readline())
                                           ["context_options"][0])


def test_boolq_requests_equal_the_harness_on_the_files_passages(data_dir, tmp_path):
    docs = []
    for line in open(data_dir.path("boolq", "boolq.jsonl"), encoding="utf-8"):
        row = json.loads(line)
        passage, _, question = row["query"].removeprefix("Passage: ").rpartition("\nQuestion: ")
        docs.append({"passage": passage, "question": question.removesuffix("?"), "label": row["gold"]})
    expected = _harness_requests(tmp_path, "super_glue/boolq/default.yaml", docs, "validation")
    assert _ours(_rows("boolq")) == expected
    assert len(expected) == 2 * data_dir.rows("boolq/boolq.jsonl", full=3270)


COPA_ROWS = [  # llm-foundry's format of SuperGLUE COPA validation items 0 and 1 (the file is not shipped)
    {"query": "The man turned on the faucet, therefore", "gold": 1,
     "choices": ["the toilet filled with water.", "water flowed from the spout."]},
    {"query": "The girl found a bug in her cereal, therefore", "gold": 1,
     "choices": ["she poured milk in the bowl.", "she lost her appetite."]},
]


def test_copa_requests_equal_the_harness(tmp_path, monkeypatch):
    (tmp_path / "copa").mkdir()
    (tmp_path / "copa" / "copa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in COPA_ROWS))
    monkeypatch.setenv("T5LITE_DATA_DIR", str(tmp_path))
    docs = [{"premise": r["query"].rpartition(", ")[0] + ".", "choice1": r["choices"][0].capitalize(),
             "choice2": r["choices"][1].capitalize(), "question": "effect", "label": r["gold"]} for r in COPA_ROWS]
    expected = _harness_requests(tmp_path, "super_glue/copa/default.yaml", docs, "validation")
    assert _ours(_rows("copa")) == expected
    assert expected[0] == ("The man turned on the faucet therefore", "  the toilet filled with water.")


@pytest.mark.full_data
def test_copa_reads_the_full_validation_set(data_dir):
    questions = benchmarks.copa_questions("test")
    assert len(questions) == 100 and [q.labels.index(1) for q in questions].count(0) == 55
    assert sum(q.prompts[0].endswith(" because") for q in questions) == 52
    assert all("," not in q.prompts[0][-12:] and all(c.startswith(" ") for c in q.choices) for q in questions)


def test_hellaswag_request_equals_the_harness_for_the_first_item(data_dir, tmp_path):
    expected = _harness_requests(tmp_path, "hellaswag/hellaswag.yaml", [HELLASWAG_FIRST], "validation")
    questions = benchmarks.hellaswag_questions("test")
    assert _ours(mc.rows(questions[:1])) == expected
    assert expected[0] == ("Roof shingle removal: A man is sitting on a roof. He",
                           " is using wrap to wrap a pair of skis.")
    assert len(questions) == data_dir.rows("hellaswag_llamacpp/hellaswag_val_full.txt.bz2", full=10042)
    assert questions[0].category == "Roof shingle removal" and questions[0].labels == (0, 0, 0, 1)
    with bz2.open(data_dir.path("hellaswag_llamacpp", "hellaswag_val_full.txt.bz2"), "rt", encoding="utf-8") as f:
        labels = f.read().split("\n")[1::6]
    assert [q.labels.index(1) for q in questions] == [int(x) for x in labels[:len(questions)]]


def test_hellaswag_capitalises_the_words_after_the_last_sentence_end_only():
    assert benchmarks.hellaswag_query("Clean and jerk: A lady walks. She bends. the lady") == \
        "Clean and jerk: A lady walks. She bends. The lady"
    assert benchmarks.hellaswag_query("Home: [header] How to x [title] Do y. Then z") == "Home: How to x. Do y. Then z"


def test_winogender_sets_score_the_query_and_each_choice(data_dir):
    for pronouns in ("female", "male"):
        rows = _rows(f"winogender_{pronouns}")
        raw = [json.loads(line) for line in open(data_dir.path("winogender", f"winogender_mc_{pronouns}.jsonl"))]
        assert len(rows) == 2 * len(raw) == 120
        assert _ours(rows[:2]) == [(raw[0]["query"], " " + c) for c in raw[0]["choices"]]


@pytest.mark.parametrize("task", [*benchmarks.BENCHMARKS])
def test_each_task_has_an_encoder_decoder_and_a_decoder_only_variant_without_eos_in_targets(task, data_dir):
    if task == "copa" and not data_dir.full:
        pytest.skip("copa's data is not shipped (no license stated); its loader is tested on hand-written rows")
    enc_dec = seqio.TaskRegistry.get(task)
    decoder_only = seqio.TaskRegistry.get(task + "_prefix_lm")
    assert enc_dec.output_features["inputs"].add_eos and not decoder_only.output_features["inputs"].add_eos
    assert not enc_dec.output_features["targets"].add_eos and not decoder_only.output_features["targets"].add_eos
    example = next(decoder_only.get_dataset({"inputs": 64, "targets": 32}, split="test", shuffle=False)
                   .as_numpy_iterator())
    vocabulary = decoder_only.output_features["targets"].vocabulary
    assert list(example["targets"]) == vocabulary.encode(example["targets_pretokenized"].decode())[:32]


def test_the_suite_mixture_holds_every_benchmark():
    names = {t.name for t in seqio.get_subtasks(seqio.get_mixture_or_task("benchmarks"))}
    assert names == {"arc_easy", "arc_challenge", "lambada", *benchmarks.BENCHMARKS}
    names = {t.name for t in seqio.get_subtasks(seqio.get_mixture_or_task("benchmarks_prefix_lm"))}
    assert all(n.endswith("_prefix_lm") for n in names) and len(names) == 3 + len(benchmarks.BENCHMARKS)


def test_num_fewshot_outside_mmlus_dev_split_is_a_user_error():
    from t5lite.errors import UserError

    gin.bind_parameter("benchmarks.num_fewshot", 6)
    with pytest.raises(UserError, match="MMLU has 5 dev examples per subject"):
        benchmarks.num_fewshot()


def _random_checkpoint(model_dir):
    """A freshly initialised tiny T5 saved as checkpoint 1 (the suite needs no trained model to run)."""
    import jax

    from t5lite import checkpoints, gin_cli, partitioning, trainer
    from t5lite.model.config import TransformerConfig
    from t5lite.model.models import Model
    from t5lite.optim import make_optimizer

    gin_cli.parse_gin(["gin/base.gin", "gin/models/t5_1_1_tiny.gin"], [])
    model = Model(TransformerConfig())
    mesh = partitioning.make_mesh()
    init = trainer.make_sharded_init(model, make_optimizer().tx, model.input_shapes(4, {"inputs": 64, "targets": 16}),
                                     mesh, partitioning.axis_rules("dp"))
    ckpt = checkpoints.Checkpointer(os.path.join(model_dir, "checkpoints"), save_every=1, keep=None)
    ckpt.save(1, init.init_fn(jax.random.PRNGKey(0)), force=True)
    ckpt.wait()
    ckpt.close()
    gin.clear_config()


@pytest.mark.slow
def test_the_suite_command_prints_one_table_and_writes_json_and_markdown(data_dir, tmp_path, monkeypatch, capsys):
    import shutil

    from t5lite import eval as eval_lib

    data = tmp_path / "data"
    shutil.copytree(data_dir, data)
    if not (data / "copa").exists():
        (data / "copa").mkdir()
        (data / "copa" / "copa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in COPA_ROWS))
    monkeypatch.setenv("T5LITE_DATA_DIR", str(data))
    model_dir = str(tmp_path / "run")
    _random_checkpoint(model_dir)
    assert eval_lib.main(["--gin_file=gin/runs/benchmarks.gin", "--gin_file=gin/models/t5_1_1_tiny.gin",
                          f"--gin.MODEL_DIR='{model_dir}'", "--gin.evaluate.num_examples=8", "--gin.NUM_FEWSHOT=5",
                          "--gin.evaluate.task_feature_lengths={'inputs': 64, 'targets': 16}",
                          "--gin.evaluate.batch_size=4"]) == 0
    out = capsys.readouterr().out
    header = next(line for line in out.splitlines() if line.startswith("task "))
    assert header.split() == ["task", "metric", "value", "stderr", "chance", "n", "seconds", "contaminated"]
    with open(os.path.join(model_dir, "eval", "benchmarks_step_1.json")) as f:
        table = json.load(f)
    assert table["num_fewshot"] == 5
    rows = {(r["task"], r["metric"]): r for r in table["rows"]}
    assert {t for t, _ in rows} >= {"arc_easy", "hellaswag", "mmlu", "mmlu/stem", "truthfulqa_mc2", "winogrande",
                                    "boolq", "copa", "lambada", "winogender gap (female - male)"}
    assert rows[("hellaswag", "length_normalized_accuracy")]["chance"] == 25.0
    assert rows[("truthfulqa_mc2", "mc2")]["n"] >= 1 and rows[("boolq", "accuracy")]["chance"] == 50.0
    assert all(0 <= r["value"] <= 100 for (t, _), r in rows.items() if "gap" not in t)
    assert rows[("hellaswag", "accuracy")]["seconds"] > 0
    # Against the default run's training data (base.gin's mixture): a percentage for every task's row.
    assert all(0 <= r["contaminated"] <= 100 for (t, _), r in rows.items() if "/" not in t and "gap" not in t)
    markdown = open(os.path.join(model_dir, "eval", "benchmarks_step_1.md")).read()
    assert "| task | metric | value | stderr | chance | n | seconds | contaminated |" in markdown
    assert "| mmlu/stem |" in markdown
    # The per-example records of the same run feed the error analysis.
    from t5lite import analyze

    report = open(analyze.analyze(os.path.join(model_dir, "eval"))).read()
    assert "## mmlu" in report and "### Accuracy by category" in report and "### Wrong predictions" in report


def test_the_contamination_column_counts_the_rows_whose_text_the_training_data_holds(data_dir, tmp_path):
    from t5lite import evaluation
    from t5lite.data import contamination, pipeline, sources, tasks

    # A training corpus holding ARC-Easy's first question (its 4 choices are 4 rows) and nothing else of it.
    question = pipeline.raw_texts("arc_easy", "test", limit=1)[0].split("\nAnswer:")[0]
    corpus = tmp_path / "train.txt"
    corpus.write_text(f"Some other line of text that has nothing to do with science at all.\n{question}\n")
    tasks.add_pretraining_task("t5lite_test_holds_an_arc_question",
                               sources.file_source({"train": str(corpus)}, file_format="text"), objective="lm")
    reports = contamination.contamination_of_tasks("t5lite_test_holds_an_arc_question", "arc_easy", "test", limit=12)
    assert reports["arc_easy"].examples == 12 and reports["arc_easy"].contaminated_examples == 4
    rows = evaluation.benchmark_table({"arc_easy": {"accuracy": 50.0, "chance_accuracy": 25.0, "num_questions": 3}},
                                      {"arc_easy": 1.0}, lambda task: ["accuracy"],
                                      {t: r.percent_examples for t, r in reports.items()})
    assert rows[0]["contaminated"] == pytest.approx(100 / 3)
    assert "33.33" in evaluation.format_table(rows).splitlines()[1]


def _docs_example():
    text = open(os.path.join(os.path.dirname(__file__), "..", "docs", "evaluation.md"), encoding="utf-8").read()
    code = text.split("```python\n# my_mc_tasks.py\n", 1)[1].split("```", 1)[0]
    return code.replace("my_sentiment", "t5lite_test_mc")


def test_the_docs_multiple_choice_example_scores_like_the_harness(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "my_data").mkdir()
    reviews = [("A joy from start to end.", 1), ("Dull and far too long.", 0), ("I loved every minute.", 1)]
    (tmp_path / "my_data" / "reviews.jsonl").write_text(
        "".join(json.dumps({"review": r, "choices": ["negative", "positive"]}) + "\n" for r, _ in reviews))
    (tmp_path / "my_data" / "labels.txt").write_text("".join(f"{label}\n" for _, label in reviews))
    exec(compile(_docs_example(), "my_mc_tasks.py", "exec"), {})
    task = seqio.TaskRegistry.get("t5lite_test_mc")
    assert not task.output_features["targets"].add_eos  # continuations are scored without EOS
    rows = list(task.source.get_dataset(split="validation", shuffle=False).as_numpy_iterator())
    assert [(r["inputs"].decode(), r["targets"].decode(), r["is_correct"]) for r in rows[:2]] == [
        ("Review: A joy from start to end.\nSentiment:", " negative", 0),
        ("Review: A joy from start to end.\nSentiment:", " positive", 1)]
    # A toy model that always prefers " negative" (log p -1 vs -2): right once in 3; per character
    # (len("negative") = len("positive") = 8) the same; chance 50, not 100.
    targets = [task.postprocess_fn(r["targets"].decode(), example=r, is_target=True) for r in rows]
    scores = [-1.0 if r["targets"] == b" negative" else -2.0 for r in rows]
    assert task.score_metric_fns == [metrics.rank_classification]
    result = metrics.rank_classification(targets, scores)
    assert result["accuracy"] == pytest.approx(100 / 3) and result["chance_accuracy"] == 50.0
    assert result["length_normalized_accuracy"] == pytest.approx(100 / 3)


@pytest.mark.parametrize("label,message", [('"0"', r"labels.txt:1: the label must be an integer index"),
                                           ("2", r"labels.txt:1: label 2 is not an index into the 2 choices")])
def test_a_label_that_is_not_an_index_into_the_choices_is_an_error(tmp_path, label, message):
    from t5lite.data import tasks
    from t5lite.errors import UserError

    (tmp_path / "rows.jsonl").write_text(json.dumps({"question": "q", "choices": ["a", "b"]}) + "\n")
    (tmp_path / "labels.txt").write_text(label + "\n")
    name = f"t5lite_test_bad_label_{label.strip(chr(34))}"
    tasks.add_multiple_choice_task(name, str(tmp_path / "rows.jsonl"), label_files=str(tmp_path / "labels.txt"))
    with pytest.raises(UserError, match=message):
        list(seqio.TaskRegistry.get(name).source.get_dataset(split="validation", shuffle=False))
    (tmp_path / "inline.jsonl").write_text(json.dumps({"question": "q", "choices": ["a", "b"], "label": "0"}) + "\n")
    tasks.add_multiple_choice_task(name + "_inline", str(tmp_path / "inline.jsonl"))
    with pytest.raises(UserError, match=r"inline.jsonl:1: the label must be an integer index .* got '0' \(a string\)"):
        list(seqio.TaskRegistry.get(name + "_inline").source.get_dataset(split="validation", shuffle=False))


def _harness_docs(task, data_dir):
    """(harness task YAML, its split, the rows of t5lite's data file in the harness data set's schema)."""
    def jsonl(*parts):
        return [json.loads(line) for line in open(data_dir.path(*parts), encoding="utf-8")]

    if task in ("arc_easy", "arc_challenge"):
        docs = []
        for row in jsonl("arc", f"{task}.jsonl"):
            labels = "ABCDE"[:len(row["choices"])]
            docs.append({"question": row["query"].removeprefix("Question: "),
                         "choices": {"text": row["choices"], "label": list(labels)}, "answerKey": labels[row["gold"]]})
        return f"arc/{task}.yaml", "test", docs
    if task in ("truthfulqa_mc1", "truthfulqa_mc2"):
        with open(data_dir.path("truthfulqa", "v0", "mc_task.json"), encoding="utf-8") as f:
            items = json.load(f)
        docs = [{"question": it["question"], **{f"{t}_targets": {"choices": list(it[f"{t}_targets"]),
                                                                 "labels": list(it[f"{t}_targets"].values())}
                                                for t in ("mc1", "mc2")}} for it in items]
        return f"truthfulqa/{task}.yaml", "validation", docs
    if task == "winogrande":
        docs = []
        for row in jsonl("winogrande", "winogrande.jsonl"):
            first, second = row["context_options"]
            prefix = os.path.commonprefix([first, second])
            docs.append({"sentence": f"{prefix}_ {row['continuation']}", "option1": first[len(prefix):],
                         "option2": second[len(prefix):], "answer": str(row["gold"] + 1)})
        return "winogrande/default.yaml", "validation", docs
    if task == "boolq":
        docs = []
        for row in jsonl("boolq", "boolq.jsonl"):
            passage, _, question = row["query"].removeprefix("Passage: ").rpartition("\nQuestion: ")
            docs.append({"passage": passage, "question": question.removesuffix("?"), "label": row["gold"]})
        return "super_glue/boolq/default.yaml", "validation", docs
    raise KeyError(task)


def _harness_items(task, data_dir, tmp_path):
    """[(harness task, doc, its requests)] in t5lite's row order (MMLU: subjects alphabetically)."""
    if task == "mmlu":
        parts = [(f"mmlu/default/mmlu_{s}.yaml", "test", _mmlu_docs(data_dir, "test", s))
                 for s in sorted(benchmarks.MMLU_SUBJECTS)]
    else:
        parts = [_harness_docs(task, data_dir)]
    items = []
    for yaml_path, split, docs in parts:
        harness_task, requests = _harness_task_and_requests(tmp_path, yaml_path, docs, split)
        items += [(harness_task, doc, rs) for doc, rs in zip(docs, requests, strict=True)]
    return items


HARNESS_TASKS = ("arc_easy", "arc_challenge", "mmlu", "truthfulqa_mc1", "truthfulqa_mc2", "winogrande", "boolq")


@pytest.mark.slow
def test_per_example_loglikelihoods_and_accuracies_equal_the_real_harness(tmp_path, monkeypatch):
    """A tiny t5lite model trained a few steps, exported with t5lite.hf_t5, scored by lm-evaluation-harness (HFLM,
    seq2seq) and by python -m t5lite.eval over the same rows (the shipped excerpts): every continuation's
    log-likelihood equal to 1e-4, and acc / acc_norm (mc2) equal per question."""
    pytest.importorskip("lm_eval")
    pytest.importorskip("torch")
    from conftest import EXCERPTS_DIR, DataDir
    from lm_eval.models.huggingface import HFLM

    from t5lite import eval as eval_lib
    from t5lite import hf_t5
    from t5lite import train as train_lib
    from t5lite.data.vocab import get_default_vocabulary

    data_dir = DataDir(EXCERPTS_DIR, full=False)
    monkeypatch.setenv("T5LITE_DATA_DIR", data_dir)
    model_dir = str(tmp_path / "run")
    assert train_lib.main(["--gin_file=gin/base.gin", "--gin_file=gin/models/t5_1_1_tiny.gin", "--gin.TRAIN_STEPS=20",
                           "--gin.TASK_FEATURE_LENGTHS={'inputs': 64, 'targets': 16}", "--gin.BATCH_SIZE=8",
                           "--gin.EvalConfig.batches=1", "--gin.CheckpointConfig.every=20",
                           f"--gin.MODEL_DIR='{model_dir}'"]) == 0
    gin.clear_config()
    export = str(tmp_path / "hf")
    assert hf_t5.main([f"--checkpoint={model_dir}/checkpoints/20", f"--output={export}"]) == 0
    if "t5lite_test_harness" not in seqio.MixtureRegistry.names():
        seqio.MixtureRegistry.add("t5lite_test_harness", list(HARNESS_TASKS), default_rate=1.0)
    assert eval_lib.main(["--gin_file=gin/runs/benchmarks.gin", "--gin_file=gin/models/t5_1_1_tiny.gin",
                          f"--gin.MODEL_DIR='{model_dir}'", "--gin.SUITE='t5lite_test_harness'",
                          "--gin.evaluate.batch_size=16"]) == 0
    gin.clear_config()

    import transformers

    # HFLM calls model.tie_weights(), and transformers 5 reads the export's "tie_word_embeddings": false as True
    # (tests/test_hf_t5.py), so lm_head would become the embedding table: another model, hundreds of nats off.
    # Set after loading, the attribute holds, and the harness scores the exported model.
    model = transformers.T5ForConditionalGeneration.from_pretrained(export).eval()
    model.config.tie_word_embeddings = False
    lm = HFLM(pretrained=model, tokenizer=transformers.AutoTokenizer.from_pretrained(export), backend="seq2seq",
              device="cpu", batch_size=32, max_length=512)
    # Tokenizers: the exported one starts a new word after "\n" where t5lite's SentencePiece model has a "\n"
    # piece (tests/test_hf_t5.py), and even SentencePiece's Python and TensorFlow ops (seqio tokenizes with the
    # latter) split a few digit groups differently ("8,000": "0" "00" vs "00" "0", 10 of the 400 BoolQ rows
    # here). The harness encodes as t5lite's pipeline does, so that the comparison is of the prompts, the
    # scoring and the model.
    import tensorflow as tf

    vocabulary = get_default_vocabulary()
    lm.tok_encode = lambda string, add_special_tokens=None, left_truncate_len=None, **kw: (
        vocabulary.encode_tf(tf.constant(string)).numpy().tolist() + ([1] if add_special_tokens is not False else []))[
        -(left_truncate_len or 10**9):]
    agreement = {}
    for task in HARNESS_TASKS:
        items = _harness_items(task, data_dir, tmp_path)
        requests = [r for _, _, rs in items for r in rs]
        lls = [ll for ll, _ in lm.loglikelihood(requests, disable_tqdm=True)]
        with open(os.path.join(model_dir, "eval", "examples_step_20", f"{task}.jsonl"), encoding="utf-8") as f:
            ours = [json.loads(line) for line in f]
        # At least 200 items of each task (the excerpts).
        assert len(ours) == len(requests) and len(items) >= 200
        assert [(r["inputs"], r["targets"]) for r in ours] == [r.arguments for r in requests]
        difference = max(abs(a["score"] - b) for a, b in zip(ours, lls, strict=True))
        assert difference < 1e-4, task
        i = 0
        for harness_task, doc, doc_requests in items:
            n = len(doc_requests)
            harness = harness_task.process_results(doc, [(ll, False) for ll in lls[i:i + n]])
            rows = ours[i:i + n]
            ours_metrics = metrics.mc2 if task == "truthfulqa_mc2" else metrics.rank_classification
            mine = ours_metrics([(0, r["is_correct"], r["choice_length"]) for r in rows], [r["score"] for r in rows])
            if task == "truthfulqa_mc2":
                assert mine["mc2"] == pytest.approx(100 * harness["acc"], abs=0.01)  # log-likelihoods to 1e-4
            else:
                assert mine["accuracy"] == 100 * harness["acc"]
                if "acc_norm" in harness:
                    assert mine["length_normalized_accuracy"] == 100 * harness["acc_norm"]
            i += n
        agreement[task] = (len(items), len(requests), difference)
    print("harness agreement (items, continuations, max |log-likelihood difference|):", agreement)


def _harness_task_and_requests(tmp_path, yaml_path, docs, split):
    pytest.importorskip("lm_eval")
    import lm_eval.tasks
    from lm_eval.api.task import ConfigurableTask
    from lm_eval.tasks._yaml_loader import load_yaml

    path = str(tmp_path / f"{os.path.basename(yaml_path)}.{split}.jsonl")
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(d) + "\n" for d in docs)
    config = load_yaml(os.path.join(os.path.dirname(lm_eval.tasks.__file__), yaml_path))
    config.update(dataset_path="json", dataset_name=None, dataset_kwargs={"data_files": {split: path}},
                  training_split=None, validation_split=split if split == "validation" else None,
                  test_split=split if split == "test" else None)
    config.pop("fewshot_split", None)  # zero-shot: no dev split to read
    task = ConfigurableTask(config=config)
    requests = []
    for i, doc in enumerate(task.test_docs() if split == "test" else task.validation_docs()):
        requests.append(task.construct_requests(doc, task.fewshot_context(doc, num_fewshot=0), metadata=("t", i, 0)))
    return task, requests


def test_a_split_smaller_than_one_packed_batch_is_one_padded_batch_for_the_loss(data_dir):
    # A decoder-only model's teacher-forced loss packs prompt and continuation: Winogender's short
    # rows fill fewer rows of 576 tokens than one batch (COPA's 200 rows: 7), which dropped the task.
    from t5lite import evaluation

    lengths = {"inputs": 512, "targets": 64}
    task = seqio.get_mixture_or_task("winogender_female_prefix_lm")
    examples = list(task.get_dataset(lengths, split="test", shuffle=False).as_numpy_iterator())
    batches = evaluation.load_eval_batches(["winogender_female_prefix_lm"], split="test", max_batches=8,
                                           task_feature_lengths=lengths, model_type="prefix_lm", batch_size=64, seed=0)
    [batch] = batches["winogender_female_prefix_lm"]
    weights = batch["decoder_loss_weights"]
    assert weights.shape[0] == 64 and not weights[-1].any()  # filled up with empty rows
    assert weights.sum() == sum(len(ex["targets"]) for ex in examples)  # every continuation token, once


def test_scoring_batches_rows_by_length_and_cuts_each_batch_to_a_power_of_two():
    import numpy as np
    import tensorflow as tf

    from t5lite import evaluation

    n = 5
    rows = {"encoder_input_tokens": np.zeros((n, 512), np.int32), "decoder_target_tokens": np.zeros((n, 64), np.int32),
            "decoder_input_tokens": np.zeros((n, 64), np.int32), "decoder_loss_weights": np.zeros((n, 64), np.int32)}
    for row, prompt in enumerate([9, 70, 3, 20, 200]):
        rows["encoder_input_tokens"][row, :prompt] = 5
    rows["decoder_target_tokens"][2, :3] = 7
    rows["decoder_input_tokens"][2, 1:3] = 7  # starts with 0 (BOS), like every decoder input
    rows["decoder_loss_weights"][2, :3] = 1
    dataset = tf.data.Dataset.from_tensor_slices(rows).enumerate()
    batches = list(evaluation.length_bucketed_batches(dataset, batch_size=2))
    assert [indices.tolist() for indices, _ in batches] == [[4, 1], [3, 0], [2]]  # longest prompts first
    assert [b["encoder_input_tokens"].shape for _, b in batches] == [(2, 256), (2, 32), (2, 8)]
    assert all(b["decoder_target_tokens"].shape == (2, 8) for _, b in batches)  # the whole dataset's bucket
    for indices, batch in batches:  # nothing real cut; the last batch filled up with an empty row
        for name, value in batch.items():
            assert (value[:len(indices)] == rows[name][indices, :value.shape[1]]).all()
            assert not rows[name][indices, value.shape[1]:].any() and not value[len(indices):].any()
    full = {k: np.full((2, 16), 3, np.int32) for k in ("encoder_input_tokens", "decoder_target_tokens")}
    [(_, batch)] = evaluation.length_bucketed_batches(tf.data.Dataset.from_tensor_slices(full).enumerate(), 4)
    assert batch["encoder_input_tokens"].shape == (4, 16)  # never past the padded length

"""Downstream and zero-shot tasks read the real public datasets in the documented formats: the full sets at
$T5LITE_DATA_DIR when it is set, else the excerpts in tests/data/excerpts (the `data_dir` fixture, conftest.py).
SST-2 and Multi30k are not redistributable, so their tests need the full data sets (@pytest.mark.full_data)."""

import gzip
import json

import pytest
import seqio

from t5lite.data import downstream, pipeline
from t5lite.data.vocab import get_default_vocabulary
from t5lite.errors import UserError

pytestmark = pytest.mark.usefixtures("data_dir")  # every test reads (or unsets) $T5LITE_DATA_DIR


def _raw(task, split):
    ds = seqio.TaskRegistry.get(task).source.get_dataset(split=split, shuffle=False)
    return [{k: v.decode() for k, v in ex.items()} for ex in ds.as_numpy_iterator()]


@pytest.mark.full_data
def test_sst2_validation_is_the_glue_dev_set():
    rows = _raw("sst2", "validation")
    assert len(rows) == 872
    assert sum(r["targets"] == "positive" for r in rows) == 444
    assert rows[0]["inputs"].startswith("sst2 sentence: ")


@pytest.mark.full_data
def test_multi30k_splits_are_line_aligned_pairs():
    assert [len(_raw("multi30k_en_de", s)) for s in ("validation", "test")] == [1014, 1000]
    first = _raw("multi30k_en_de", "validation")[0]
    assert first == {"inputs": "translate English to German: A group of men are loading cotton onto a truck",
                     "targets": "Eine Gruppe von Männern lädt Baumwolle auf einen Lastwagen"}


def test_squad_dev_is_split_by_article_without_shared_contexts(data_dir):
    train, val = _raw("squad_v1_1", "train"), _raw("squad_v1_1", "validation")
    total = data_dir.rows("squad_v1.1/dev-v1.1.json", full=10570)  # the excerpt: 1st paragraph of each article
    assert len(train) + len(val) == total and 0.1 < len(val) / total < 0.35
    context = lambda r: r["inputs"].split(" context: ", 1)[1]  # noqa: E731
    assert not {context(r) for r in train} & {context(r) for r in val}
    assert all(r["targets"] in r["inputs"] for r in val[:50])  # extractive answers


# SST-2 when the full data sets are there; SQuAD's rows, shipped as an excerpt, always.
DOWNSTREAM_TASKS = [pytest.param("sst2", marks=pytest.mark.full_data), "squad_v1_1"]


@pytest.mark.parametrize("task", DOWNSTREAM_TASKS)
def test_tokenized_batches_for_fine_tuning(task):
    batch = next(pipeline.get_batches(task, split="validation", task_feature_lengths={"inputs": 64, "targets": 4},
                                      model_type="encoder_decoder", batch_size=4, shuffle=False, seed=0))
    assert batch["encoder_input_tokens"].shape == (4, 64) and batch["decoder_target_tokens"].shape == (4, 4)


@pytest.mark.parametrize("task", DOWNSTREAM_TASKS)
def test_downstream_tasks_register_again_in_another_vocabulary(task):
    downstream.register_downstream_tasks(seqio.ByteVocabulary(extra_ids=100), suffix="_bytes")
    for name in ("sst2", "multi30k_en_de", "squad_v1_1"):
        features = seqio.TaskRegistry.get(f"{name}_bytes").output_features
        assert all(isinstance(f.vocabulary, seqio.ByteVocabulary) for f in features.values())
        assert seqio.TaskRegistry.get(name).output_features["inputs"].vocabulary == get_default_vocabulary()
    batch = next(pipeline.get_batches(f"{task}_bytes", split="validation", task_feature_lengths={"inputs": 64,
                                      "targets": 12}, model_type="encoder_decoder", batch_size=2, shuffle=False,
                                      seed=0, pack=False))
    text = _raw(task, "validation")[0]["inputs"]
    assert list(batch["encoder_input_tokens"][0][:20]) == [b + 3 for b in text.encode()[:20]]  # bytes + 3


def test_missing_data_dir_says_how_to_set_it(monkeypatch):
    monkeypatch.delenv(downstream.DATA_DIR_ENV)
    with pytest.raises(UserError, match="T5LITE_DATA_DIR"):
        _raw("sst2", "validation")
    monkeypatch.setenv(downstream.DATA_DIR_ENV, "/nonexistent")
    with pytest.raises(UserError, match="/nonexistent/sst2/dev.tsv does not exist"):
        _raw("sst2", "validation")


def test_sst2_and_multi30k_loaders_read_the_documented_formats(tmp_path, monkeypatch):
    """Their data sets are not shipped (no license to redistribute them): hand-written rows in their formats
    (GLUE TSV, no quoting; gzipped line-aligned text), so the loaders run without the full data sets too."""
    (tmp_path / "sst2").mkdir()
    (tmp_path / "sst2" / "dev.tsv").write_text('sentence\tlabel\nit \'s a " quoted -lrb- film \t1\na dull one \t0\n')
    (tmp_path / "multi30k").mkdir()
    for stem, english, german in (("val", "A dog runs.\nTwo men.\n", "Ein Hund rennt.\nZwei Männer.\n"),
                                  ("test_2016_flickr", "One line.\n", "Eine Zeile.\nZwei Zeilen.\n")):
        with gzip.open(tmp_path / "multi30k" / f"{stem}.en.gz", "wt", encoding="utf-8") as f:
            f.write(english)
        with gzip.open(tmp_path / "multi30k" / f"{stem}.de.gz", "wt", encoding="utf-8") as f:
            f.write(german)
    monkeypatch.setenv(downstream.DATA_DIR_ENV, str(tmp_path))
    assert _raw("sst2", "validation") == [
        {"inputs": 'sst2 sentence: it \'s a " quoted -lrb- film', "targets": "positive"},
        {"inputs": "sst2 sentence: a dull one", "targets": "negative"}]
    assert _raw("multi30k_en_de", "validation")[1] == {"inputs": "translate English to German: Two men.",
                                                       "targets": "Zwei Männer."}
    with pytest.raises(UserError, match="test_2016_flickr: 1 English but 2 German lines"):
        _raw("multi30k_en_de", "test")


def _raw_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _references_of(example):
    return seqio.TaskRegistry.get("squad_v1_1").postprocess_fn("", example=example, is_target=True)


def test_squad_keeps_every_reference_answer():
    example = next(seqio.TaskRegistry.get("squad_v1_1").get_dataset(
        {"inputs": 512, "targets": 16}, split="validation", shuffle=False).as_numpy_iterator())
    assert _references_of(example) == ["the curriculum.", "curriculum", "curriculum"]


def test_squad_metric_takes_the_max_over_references_through_seqio_evaluator():
    """The first three validation questions, predictions decoded from fixed token ids:
    refs ["the curriculum.", "curriculum", "curriculum"], "the school curriculum": EM 0, F1 2/3
      ("school curriculum" vs "curriculum": P 1/2, R 1);
    refs ["pedagogy", "pedagogy", "formal education"], "formal education": EM 1, F1 1 (3rd ref only);
    refs ["university or college.", "university", "university or college"], "a university": EM 1,
      F1 1 (2nd ref). EM 2/3, F1 (2/3 + 1 + 1) / 3 = 8/9. Against the first reference only, EM
    would be 0 and F1 (2/3 + 0 + 1/2) / 3."""
    vocabulary = get_default_vocabulary()
    predictions = ["the school curriculum", "formal education", "a university"]
    evaluator = seqio.Evaluator("squad_v1_1", eval_split="validation", num_examples=3,
                                feature_converter=seqio.EncDecFeatureConverter(pack=False),
                                sequence_length={"inputs": 512, "targets": 16}, async_compute_metrics=False)

    def predict_fn(dataset, model_feature_shapes=None):
        padded = lambda tokens: tokens + [0] * (16 - len(tokens))  # noqa: E731  (decoded rows are padded)
        return [(int(i), padded(vocabulary.encode(predictions[int(i)]))) for i, _ in dataset.as_numpy_iterator()]

    result, _ = evaluator.evaluate(compute_metrics=True, predict_fn=predict_fn, score_fn=None)
    squad = {k: getattr(v, "value", v) for k, v in result.result()["squad_v1_1"].items()}
    assert squad["em"] == pytest.approx(100 * 2 / 3)
    assert squad["f1"] == pytest.approx(100 * 8 / 9)


@pytest.mark.parametrize("task,file_name,full_questions", [("arc_easy", "arc_easy.jsonl", 2376),
                                                           ("arc_challenge_prefix_lm", "arc_challenge.jsonl", 1172)])
def test_arc_has_one_row_per_question_and_choice(data_dir, task, file_name, full_questions):
    num_questions = data_dir.rows(f"arc/{file_name}", full=full_questions)
    questions = _raw_jsonl(data_dir.path("arc", file_name))
    assert len(questions) == num_questions
    rows = seqio.TaskRegistry.get(task).source.get_dataset(split="test", shuffle=False)
    rows = list(rows.as_numpy_iterator())
    assert len(rows) == sum(len(q["choices"]) for q in questions)
    first = [r for r in rows if r["question_id"] == 0]
    assert [r["targets"].decode() for r in first] == [" " + c for c in questions[0]["choices"]]  # " ": the harness's
    assert [r["is_correct"] for r in first] == [int(i == questions[0]["gold"]) for i in range(4)]
    assert first[0]["inputs"].decode() == questions[0]["query"] + "\nAnswer:"
    assert sum(r["is_correct"] for r in rows) == num_questions  # one right choice each


def test_lambada_rows_are_passage_and_last_word(data_dir):
    raw = _raw_jsonl(data_dir.path("lambada_openai", "lambada_openai.jsonl"))
    rows = _raw("lambada", "test")
    assert len(rows) == len(raw) == data_dir.rows("lambada_openai/lambada_openai.jsonl", full=5153)
    assert rows[0] == {"inputs": raw[0]["context"], "targets": raw[0]["continuation"]}


@pytest.mark.parametrize("task,eos", [("lambada", True), ("lambada_prefix_lm", False)])
def test_long_passages_lose_their_beginning_not_the_words_before_the_answer(task, eos):
    vocabulary = get_default_vocabulary()
    example = next(seqio.TaskRegistry.get(task).get_dataset(
        {"inputs": 16, "targets": 8}, split="test", shuffle=False).as_numpy_iterator())
    tokens = list(example["inputs"])
    full = vocabulary.encode(example["inputs_pretokenized"].decode())
    assert len(tokens) == 16
    assert tokens == (full[-15:] + [1] if eos else full[-16:])
    assert list(example["targets"]) == vocabulary.encode(example["targets_pretokenized"].decode())  # no EOS


def test_malformed_benchmark_line_is_reported_with_file_and_line(tmp_path, monkeypatch):
    (tmp_path / "arc").mkdir()
    good = json.dumps({"query": "Question: q?", "choices": ["a", "b"], "gold": 1})
    (tmp_path / "arc" / "arc_easy.jsonl").write_text(good + "\n" + good.replace('"gold": 1', '"gold": 2') + "\n")
    monkeypatch.setenv(downstream.DATA_DIR_ENV, str(tmp_path))
    with pytest.raises(UserError, match=r"arc_easy.jsonl:2: 'gold' must index 'choices'"):
        _raw("arc_easy", "test")
    with pytest.raises(UserError, match="lambada_openai/lambada_openai.jsonl does not exist"):
        _raw("lambada", "test")


def test_lambada_prediction_loses_t5_sentinels_before_the_first_word():
    postprocess = seqio.TaskRegistry.get("lambada").postprocess_fn
    assert postprocess("<extra_id_0> signs of", example={}, is_target=False).split()[0] == "signs"
    assert postprocess("signs", example={}, is_target=True) == "signs"

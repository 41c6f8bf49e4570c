"""t5lite.data.augment: noise operations, the file tool, and a supervised task reading its output."""

import json
import random

import pytest

from t5lite.data import augment, cleaning
from t5lite.errors import UserError

SENTENCES = [
    "a gripping and sensitive portrait of a family in crisis",
    "the plot is thin and the jokes fall flat every single time",
    "an unexpectedly funny, warm film that earns its tears",
    "it drags on far too long and never finds its rhythm",
]


def _edit_distance_with_transpositions(a: str, b: str) -> int:
    """Damerau-Levenshtein (optimal string alignment) distance."""
    d = [[i + j if i * j == 0 else 0 for j in range(len(b) + 1)] for i in range(len(a) + 1)]
    for i in range(1, len(a) + 1):
        for j in range(1, len(b) + 1):
            d[i][j] = min(d[i - 1][j] + 1, d[i][j - 1] + 1, d[i - 1][j - 1] + (a[i - 1] != b[j - 1]))
            if i > 1 and j > 1 and a[i - 1] == b[j - 2] and a[i - 2] == b[j - 1]:
                d[i][j] = min(d[i][j], d[i - 2][j - 2] + 1)
    return d[len(a)][len(b)]


def test_word_dropout_keeps_about_one_minus_p_and_never_empties_a_text():
    rng = random.Random(0)
    words = [f"w{i}" for i in range(2000)]
    kept = augment.drop_words(words, 0.3, rng)
    assert 0.66 * 2000 < len(kept) < 0.74 * 2000  # binomial(2000, 0.7): mean 1400, sd 20
    assert kept == [w for w in words if w in set(kept)]  # order kept
    assert all(len(augment.drop_words(["only"], 0.99, rng)) == 1 for _ in range(50))


def test_word_swap_keeps_the_words_and_moves_some():
    rng = random.Random(1)
    words = SENTENCES[1].split()
    swapped = augment.swap_words(words, 0.2, rng)
    assert sorted(swapped) == sorted(words) and swapped != words
    assert augment.swap_words(["one"], 0.5, rng) == ["one"]


def test_a_typo_is_one_keyboard_edit_of_a_letter():
    rng = random.Random(2)
    for _ in range(300):
        word = rng.choice(["sensitive", "Portrait", "crisis", "rhythm,"])
        changed = augment.typo(word, rng)
        assert _edit_distance_with_transpositions(word, changed) <= 1, (word, changed)
        assert changed.rstrip(",") != "" and changed.endswith(",") == word.endswith(",")
    assert augment.typo("123", rng) == "123"  # no letter: nothing to edit
    assert set(augment.KEYBOARD_NEIGHBOURS["s"]) == set("qweadzxc")


def test_a_file_of_records_gets_labelled_variants_reproducibly(tmp_path):
    source = tmp_path / "train.jsonl"
    source.write_text("".join(json.dumps({"sentence": s, "label": str(i % 2)}) + "\n"
                              for i, s in enumerate(SENTENCES)))
    config = augment.NoiseConfig(word_dropout=0.1, word_swap=0.1, typo=0.1)
    outputs = []
    for seed in (0, 0, 1):
        out = tmp_path / f"aug{len(outputs)}.jsonl"
        report = augment.augment_file(str(source), str(out), field="sentence", config=config, copies=3, seed=seed,
                                      cleaner=cleaning.TextCleaner())
        outputs.append([json.loads(line) for line in out.read_text().splitlines()])
    rows = outputs[0]
    assert report.examples == 4 and report.variants_written + report.duplicates + report.dropped_by_cleaning == 12
    assert outputs[0] == outputs[1] and outputs[0] != outputs[2]  # the seed decides
    originals = [r for r in rows if r["augmented"] == 0]
    assert [r["sentence"] for r in originals] == SENTENCES
    for original in originals:
        variants = [r for r in rows if r["label"] == original["label"] and r["augmented"] > 0
                    and set(r["sentence"].split()) & set(original["sentence"].split())]
        assert variants and all(v["sentence"] != original["sentence"] for v in variants)
    assert all(set(r) == {"sentence", "label", "augmented"} for r in rows)


def test_text_files_and_the_command_line(tmp_path, capsys):
    source, out = tmp_path / "train.txt", tmp_path / "aug.txt"
    source.write_text("\n".join(SENTENCES) + "\n")
    assert augment.main([f"--input={source}", f"--output={out}", "--copies=2", "--word_swap=0.3",
                         "--no_originals", f"--report={tmp_path / 'r.json'}"]) == 0
    lines = out.read_text().splitlines()
    assert 4 <= len(lines) <= 8 and not set(lines) & set(SENTENCES)
    assert all(sorted(line.split()) in [sorted(s.split()) for s in SENTENCES] for line in lines)
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["examples"] == 4 and report["variants_written"] == len(lines)
    assert json.loads(capsys.readouterr().out) == report


@pytest.mark.parametrize("argv, message", [
    (["--word_dropout=0"], "No noise chosen"),
    (["--typo=1.5"], "--typo=1.5 must be in [0, 1)"),
    (["--typo=0.1", "--copies=0"], "--copies=0 must be at least 1"),
    (["--typo=0.1", "--field=text"], "train.jsonl:1: no string field 'text'"),
])
def test_bad_arguments_and_records_are_one_line_errors(tmp_path, capsys, argv, message):
    source = tmp_path / "train.jsonl"
    source.write_text(json.dumps({"sentence": "fine", "label": "1"}) + "\n")
    out = tmp_path / "aug.jsonl"
    assert augment.main([f"--input={source}", f"--output={out}", "--field=sentence", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_input_and_output_formats_must_agree(tmp_path):
    with pytest.raises(UserError, match="both be JSONL or both text"):
        augment.augment_file(str(tmp_path / "a.jsonl"), str(tmp_path / "b.txt"), field="x",
                             config=augment.NoiseConfig(typo=0.1), copies=1, seed=0, cleaner=cleaning.TextCleaner())


def test_a_supervised_task_reads_the_augmented_file(tmp_path):
    """The documented use: the output is a file_source a task reads, labels intact."""
    from t5lite.data import sources, tasks

    source = tmp_path / "train.jsonl"
    source.write_text("".join(json.dumps({"sentence": s, "label": ["negative", "positive"][i % 2 == 0]}) + "\n"
                              for i, s in enumerate(SENTENCES)))
    out = tmp_path / "train_aug.jsonl"
    assert augment.main([f"--input={source}", f"--output={out}", "--field=sentence", "--copies=2",
                         "--word_dropout=0.2"]) == 0
    task = tasks.add_supervised_task(
        "test_augmented_reviews", sources.file_source({"train": str(out)}, file_format="jsonl",
                                                      fields=("sentence", "label")),
        inputs_field="sentence", targets_field="label")
    examples = list(task.get_dataset(None, split="train", shuffle=False).as_numpy_iterator())
    assert len(examples) == len(out.read_text().splitlines()) > len(SENTENCES)
    by_text = {json.loads(line)["sentence"]: json.loads(line)["label"] for line in out.read_text().splitlines()}
    for example in examples:
        assert by_text[example["inputs_pretokenized"].decode()] == example["targets_pretokenized"].decode()

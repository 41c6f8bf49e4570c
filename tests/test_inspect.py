"""The inspect CLI on a real task: examples, length statistics, tokens per character."""

import json

from t5lite.data import inspect as inspect_lib
from t5lite.data import vocab


def test_decode_with_eos_shows_every_document():
    v = vocab.get_default_vocabulary()
    ids = v.encode("To be") + [v.eos_id] + v.encode("or not")
    assert inspect_lib.decode_with_eos(v, ids) == "To be </s> or not"


def test_inspect_reports_lengths_and_examples(capsys):
    code = inspect_lib.main(["tiny_shakespeare_span_corruption", "--lengths={'inputs': 64, 'targets': 16}",
                             "--examples=1", "--stats_examples=20", "--json"])
    assert code == 0
    [report] = json.loads(capsys.readouterr().out)
    assert report["token_lengths"]["inputs"]["max"] == 64 and report["token_lengths"]["inputs"]["truncated"] == 0
    assert "<extra_id_0>" in report["examples"][0]["targets"] and "</s>" in report["examples"][0]["inputs"]
    assert 0.2 < report["tokens_per_character"] < 0.6


def test_inspect_unknown_name_is_a_clear_error(capsys):
    assert inspect_lib.main(["tiny_shakespeare_span_corruptin"]) == 2
    assert "tiny_shakespeare_span_corruption" in capsys.readouterr().err


# A supervised task with inputs of known lengths: the task's append_eos_after_trim cuts them to --lengths.
TASK_MODULE = '''
import seqio
import tensorflow as tf

from t5lite.data import tasks

QUESTIONS = ["{short}", "{long}", "{longer}"]


def _records(split, shuffle_files, seed=None):
    return tf.data.Dataset.from_tensor_slices({{"question": QUESTIONS, "answer": ["yes", "no", "maybe"]}})


tasks.add_supervised_task("{name}", seqio.FunctionDataSource(_records, splits=["validation"]),
                          inputs_field="question", targets_field="answer")
'''
QUESTIONS = {"short": "To be or not to be.", "long": "the quick brown fox " * 10, "longer": "jumps over the dog " * 30}


def _write_task_module(directory, module, task):
    (directory / f"{module}.py").write_text(TASK_MODULE.format(name=task, **QUESTIONS))


def _input_lengths():
    """Tokens of each question with its EOS, before any truncation."""
    v = vocab.get_default_vocabulary()
    return [len(v.encode(q)) + 1 for q in QUESTIONS.values()]


def test_inspect_counts_examples_longer_than_the_lengths_before_truncation(tmp_path, monkeypatch, capsys):
    """It printed "max 256, truncated 0" for inputs of up to 383 tokens: it measured them after the
    task's own truncation. The statistics are of the untruncated examples; the examples shown are cut."""
    _write_task_module(tmp_path, "inspect_long_tasks", "inspect_long_inputs")
    monkeypatch.syspath_prepend(str(tmp_path))
    lengths = _input_lengths()
    assert lengths[0] < 16 < lengths[1] < lengths[2]
    code = inspect_lib.main(["inspect_long_inputs", "--module=inspect_long_tasks", "--examples=3",
                             "--lengths={'inputs': 16, 'targets': 8}", "--json"])
    assert code == 0
    [report] = json.loads(capsys.readouterr().out)
    inputs = report["token_lengths"]["inputs"]
    assert report["before_truncation"] and inputs["max"] == lengths[2] and inputs["truncated"] == 2
    assert report["token_lengths"]["targets"]["truncated"] == 0
    assert report["examples"][2]["inputs"].startswith("jumps over") and len(report["examples"][2]["inputs"]) < 100


def test_inspect_reads_the_tasks_of_a_gin_file_and_its_macros(tmp_path, monkeypatch, capsys):
    _write_task_module(tmp_path, "inspect_gin_tasks", "inspect_gin_inputs")
    monkeypatch.syspath_prepend(str(tmp_path))
    gin_file = tmp_path / "run.gin"
    gin_file.write_text("import inspect_gin_tasks\nMIXTURE_OR_TASK_NAME = 'inspect_gin_inputs'\n"
                        "TASK_FEATURE_LENGTHS = {'inputs': 64, 'targets': 8}\n")
    assert inspect_lib.main([f"--gin_file={gin_file}", "--stats_examples=3"]) == 0
    out = capsys.readouterr().out
    assert "=== inspect_gin_inputs [validation]" in out
    lengths = _input_lengths()
    assert f"inputs tokens: mean {sum(lengths) / 3:.1f}" in out and f"max {lengths[2]}, truncated 1" in out


def test_inspect_unknown_module_is_a_one_line_error(capsys):
    assert inspect_lib.main(["tiny_shakespeare_lm", "--module=no_such_task_module"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--module=no_such_task_module" in err and "\n" not in err

"""python -m t5lite.infer: input files, malformed lines, JSONL output, resume."""

import json

import gin
import pytest
from test_eval import _save_random_checkpoint

from t5lite import infer as infer_lib
from t5lite.errors import UserError


def test_malformed_lines_are_all_reported_with_line_numbers(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_text('{"inputs": "fine"}\nnot json\n\n["a list"]\n{"inputs": 3}\n{"inputs": "ok too"}\n')
    with pytest.raises(UserError) as error:
        infer_lib.read_input_file(str(path), needs_targets=False)
    message = str(error.value)
    assert "3 malformed line(s)" in message
    assert "line 2: not JSON" in message and "line 4:" in message and "line 5:" in message
    with pytest.raises(UserError, match="line 1: .*targets"):
        infer_lib.read_input_file(str(path), needs_targets=True)


def _records(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


@pytest.mark.slow
def test_decode_a_text_file_to_jsonl_and_resume_after_a_torn_write(tmp_path, capsys):
    model_dir = str(tmp_path / "run")
    _save_random_checkpoint(model_dir, 1, seed=0)
    inputs = tmp_path / "prompts.txt"
    inputs.write_text("".join(f"copy: line number {i}\n" for i in range(5)))
    output = str(tmp_path / "out.jsonl")
    args = ["--gin_file=gin/runs/infer.gin", "--gin_file=gin/models/t5_1_1_tiny.gin",
            f"--gin.MODEL_DIR='{model_dir}'", "--gin.TASK_FEATURE_LENGTHS={'inputs': 16, 'targets': 8}",
            f"--gin.infer.input_file='{inputs}'", f"--gin.infer.output_path='{output}'", "--gin.infer.batch_size=2"]
    assert infer_lib.main(args) == 0
    first = _records(output)
    assert [r["index"] for r in first] == list(range(5))
    assert first[3]["inputs"] == "copy: line number 3"
    assert all(isinstance(r["prediction"], str) and r["score"] <= 0 for r in first)

    # A killed run: two whole records and half of the third remain.
    with open(output, "w") as f:
        f.write("".join(json.dumps(r) + "\n" for r in first[:2]) + '{"index": 2, "inp')
    gin.clear_config()
    capsys.readouterr()
    assert infer_lib.main(args) == 0
    assert "2 already in" in capsys.readouterr().out
    assert _records(output) == first  # greedy decoding: the resumed run writes the same records

    # Scoring a JSONL file.
    scored = tmp_path / "pairs.jsonl"
    scored.write_text('{"inputs": "copy: a b", "targets": "a b"}\n{"inputs": "copy: c", "targets": "c"}\n')
    gin.clear_config()
    score_out = str(tmp_path / "scores.jsonl")
    assert infer_lib.main(args[:-3] + [f"--gin.infer.input_file='{scored}'", f"--gin.infer.output_path='{score_out}'",
                                       "--gin.infer.mode='score'"]) == 0
    records = _records(score_out)
    assert [r["targets"] for r in records] == ["a b", "c"] and all(r["score"] < 0 for r in records)

    # Decoding the first examples of a registered task.
    gin.clear_config()
    task_out = str(tmp_path / "task.jsonl")
    assert infer_lib.main(args[:-3] + ["--gin.infer.task_name='t5lite_test_copy'", "--gin.infer.num_examples=3",
                                       f"--gin.infer.output_path='{task_out}'"]) == 0
    assert [r["inputs"] for r in _records(task_out)] == ["copy: apple apple", "copy: apple river", "copy: apple stone"]


def test_a_task_with_random_preprocessing_reads_the_same_examples_every_time():
    # Span corruption draws its noise at random: a resumed run, and every process of a multi-host
    # run, must read the examples the first run read.
    task = infer_lib.get_task("tiny_shakespeare_span_corruption")
    lengths = {"inputs": 64, "targets": 16}
    first, _ = infer_lib.read_task(task, "validation", lengths, seed=0)
    again, _ = infer_lib.read_task(task, "validation", lengths, seed=0)
    other, _ = infer_lib.read_task(task, "validation", lengths, seed=1)
    assert len(first) > 10 and first == again
    assert other != first  # the seed is what fixes them

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

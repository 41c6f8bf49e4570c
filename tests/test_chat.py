"""Chat SFT: the template renders byte for byte, a causal batch weighs assistant tokens only (packed
conversations kept apart), the encoder-decoder split, bad rows named by file and line, and a tiny run
through python -m t5lite.train then t5lite.infer on a conversation."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from t5lite import infer as infer_lib
from t5lite.data import chat, pipeline, tasks, vocab
from t5lite.errors import UserError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOCAB = vocab.get_default_vocabulary()
EOS = VOCAB.eos_id
CAPITALS = [{"role": "system", "content": "You answer briefly."},
            {"role": "user", "content": "What is the capital of France?"},
            {"role": "assistant", "content": "Paris."},
            {"role": "user", "content": "And of Italy?"},
            {"role": "assistant", "content": "Rome."}]
COLOURS = [{"role": "user", "content": "Name a colour."},
           {"role": "assistant", "content": "Blue."},
           {"role": "user", "content": "Another one?"},
           {"role": "assistant", "content": "Green, like grass."}]
SHORT = [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hi!"}]


def _write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def _text(ids):
    """Token ids as text, each EOS written chat.EOS_TEXT (seqio's decode would stop at the first one)."""
    text, piece = "", []
    for token in [int(t) for t in ids if t != 0]:
        if token == EOS:
            text, piece = text + VOCAB.decode(piece) + chat.EOS_TEXT, []
        else:
            piece.append(token)
    return text + VOCAB.decode(piece)


def _task(tmp_path, name, rows, **kwargs):
    files = {"train": _write_jsonl(tmp_path / f"{name}.jsonl", rows)}
    return tasks.add_chat_task(f"test_chat_{name}", files, **kwargs).name


def test_a_multi_turn_conversation_renders_to_the_template_byte_for_byte():
    assert chat.ChatTemplate().render(CAPITALS) == (
        "<|system|>\nYou answer briefly.\n<|user|>\nWhat is the capital of France?\n<|assistant|></s>Paris.</s>"
        "<|user|>\nAnd of Italy?\n<|assistant|></s>Rome.</s>")
    # A conversation to answer ends with the open assistant marker; a gin-bound template is used as given.
    template = chat.ChatTemplate(system="SYS {content}\n", user="### User:\n{content}\n", assistant="### Bot:\n")
    assert template.render(CAPITALS[:2]) == (
        "SYS You answer briefly.\n### User:\nWhat is the capital of France?\n### Bot:\n</s>")
    # The tokens read back to the rendered text: every part is tokenized on its own, EOS after each.
    ids, weights = chat.training_tokens(chat.ChatTemplate(), CAPITALS, VOCAB.encode, EOS)
    assert _text(ids) == chat.ChatTemplate().render(CAPITALS) and len(weights) == len(ids)
    with pytest.raises(UserError, match="must hold '{content}' exactly once"):
        chat.ChatTemplate(user="<|user|>\n")


def test_a_packed_causal_batch_weighs_every_assistant_token_and_nothing_else_nor_across_conversations(tmp_path):
    name = _task(tmp_path, "causal", [{"messages": m} for m in (CAPITALS, COLOURS, SHORT)])
    batch = next(pipeline.get_batches(name + tasks.CAUSAL_CHAT_SUFFIX, split="train", task_feature_lengths={
        "targets": 256}, model_type="decoder_only", batch_size=1, shuffle=False, seed=0, num_epochs=1))
    row = {k: v[0] for k, v in batch.items()}
    segments = row["decoder_segment_ids"]
    assert sorted(set(segments) - {0}) == [1, 2, 3]  # the three conversations, packed into one row
    template = chat.ChatTemplate()
    for segment, messages in zip((1, 2, 3), (CAPITALS, COLOURS, SHORT), strict=True):
        at = np.flatnonzero(segments == segment)
        assert list(row["decoder_positions"][at]) == list(range(len(at)))  # positions restart
        assert row["decoder_input_tokens"][at[0]] == 0  # a conversation starts from BOS, not its neighbour's end
        weights, tokens = row["decoder_loss_weights"][at], row["decoder_target_tokens"][at]
        trained = _text(tokens[weights == 1])
        assert trained == "".join(m["content"] + chat.EOS_TEXT for m in messages if m["role"] == "assistant")
        assert _text(tokens[weights == 0]) == "".join(
            text + chat.EOS_TEXT for text, is_answer in template.parts(messages) if not is_answer)
    assert not row["decoder_loss_weights"][segments == 0].any()  # padding
    # Unpacked (evaluation's converter), the first conversation has the same weights.
    unpacked = next(pipeline.get_batches(name + tasks.CAUSAL_CHAT_SUFFIX, split="train", task_feature_lengths={
        "targets": 256}, model_type="decoder_only", batch_size=1, shuffle=False, seed=0, num_epochs=1, pack=False))
    length = int((segments == 1).sum())
    assert list(unpacked["decoder_loss_weights"][0][:length]) == list(row["decoder_loss_weights"][:length])


def test_encoder_decoder_examples_put_the_history_in_the_inputs_and_the_last_answer_in_the_targets(tmp_path):
    def examples(name, lengths, **kwargs):
        task = _task(tmp_path, name, [{"messages": CAPITALS}], **kwargs)
        batches = pipeline.get_batches(task, split="train", task_feature_lengths=lengths, model_type="encoder_decoder",
                                       batch_size=1, shuffle=False, seed=0, num_epochs=1, pack=False)
        return [(_text(b["encoder_input_tokens"][0]), _text(b["decoder_target_tokens"][0])) for b in batches]

    template = chat.ChatTemplate()
    lengths = {"inputs": 128, "targets": 16}
    assert examples("encdec", lengths) == [(template.render(CAPITALS[:4]), "Rome.</s>")]
    assert template.render(CAPITALS[:4]).endswith("<|user|>\nAnd of Italy?\n<|assistant|></s>")
    assert examples("every_turn", lengths, every_turn=True) == [
        (template.render(CAPITALS[:2]), "Paris.</s>"), (template.render(CAPITALS[:4]), "Rome.</s>")]
    # A history longer than the inputs loses its oldest tokens; the turn to answer stays.
    (inputs, targets), = examples("short_inputs", {"inputs": 12, "targets": 16})
    assert inputs.endswith("Italy?\n<|assistant|></s>") and "France" not in inputs and targets == "Rome.</s>"


@pytest.mark.parametrize("row, problem", [
    ({"messages": [{"role": "bot", "content": "hi"}]},
     "message 1 has role 'bot'; the roles are system, user, assistant"),
    ({"messages": [{"role": "system", "content": "x"}, {"role": "user", "content": "hi"}]}, "no assistant turn"),
    ({"messages": [{"role": "user", "content": ["hi"]}, {"role": "assistant", "content": "a"}]},
     "message 1 (user) has content of type list, not a string"),
    ({"messages": []}, "'messages' is empty"),
    ({"conversation": []}, "needs a 'messages' list"),
    ('{"messages": [', "invalid JSON"),
])
def test_a_bad_row_is_one_line_naming_file_and_line(tmp_path, row, problem):
    path = _write_jsonl(tmp_path / "bad.jsonl", [{"messages": SHORT}, row])
    name = tasks.add_chat_task(f"test_chat_bad_{abs(hash(json.dumps(row)))}", {"train": path}).name
    with pytest.raises(UserError) as error:
        pipeline.get_batches(name, split="train", task_feature_lengths={"inputs": 32, "targets": 8},
                             model_type="encoder_decoder", batch_size=1, shuffle=False, seed=0)
    assert str(error.value).startswith(f"{path}:2: ") and problem in str(error.value)
    assert "\n" not in str(error.value)


def test_a_conversation_to_answer_must_end_with_a_user_turn(tmp_path):
    path = _write_jsonl(tmp_path / "chats.jsonl", [{"messages": CAPITALS[:2]}, {"messages": CAPITALS}])
    with pytest.raises(UserError, match=r"chats.jsonl:2: the last message is a assistant turn; .* ends with a user"):
        infer_lib.read_chat_file(path, VOCAB)


@pytest.mark.slow
def test_a_tiny_decoder_only_chat_sft_run_then_infer_answers_a_conversation_with_the_template(tmp_path):
    model_dir = str(tmp_path / "run")
    gin = ["--gin_file=gin/runs/chat_sft_decoder_only.gin", "--gin_file=gin/models/decoder_only_tiny.gin"]
    train = subprocess.run(
        [sys.executable, "-m", "t5lite.train", *gin, "--gin.INITIAL_CHECKPOINT=None", f"--gin.MODEL_DIR='{model_dir}'",
         "--gin.TRAIN_STEPS=3", "--gin.BATCH_SIZE=2", "--gin.TASK_FEATURE_LENGTHS={'targets': 128}",
         "--gin.EvalConfig.every=3", "--gin.EvalConfig.batches=1", "--gin.CheckpointConfig.every=3"],
        cwd=REPO, capture_output=True, text=True, timeout=600)
    assert train.returncode == 0, train.stderr[-3000:]
    with open(os.path.join(model_dir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    assert any(r["group"] == "eval/squad_chat_lm" for r in records)

    chats = _write_jsonl(tmp_path / "chats.jsonl", [{"messages": CAPITALS[:4]}])
    output = str(tmp_path / "answers.jsonl")
    assert infer_lib.main(["--gin_file=gin/runs/infer.gin", *gin, f"--gin.MODEL_DIR='{model_dir}'",
                           "--gin.TASK_FEATURE_LENGTHS={'inputs': 64, 'targets': 8}",
                           f"--gin.infer.chat_file='{chats}'", f"--gin.infer.output_path='{output}'"]) == 0
    with open(output) as f:
        (record,) = [json.loads(line) for line in f]
    assert record["inputs"] == chat.ChatTemplate().render(CAPITALS[:4])
    assert isinstance(record["prediction"], str) and record["score"] < 0

"""Decode or score the examples of a task or an input file with a checkpoint, to JSONL.

    python -m t5lite.infer --gin_file=gin/runs/infer.gin --gin.CHECKPOINT_PATH=\\"runs/base\\" \\
        --gin.infer.input_file=\\"prompts.txt\\" --gin.infer.output_path=\\"runs/base/prompts.jsonl\\"
    python -m t5lite.infer --gin_file=gin/runs/infer.gin --gin.infer.task_name=\\"wikitext2_span_corruption\\" \\
        --gin.infer.mode=\\"score\\" --gin.infer.output_path=\\"scores.jsonl\\"
    python -m t5lite.infer --gin_file=gin/runs/infer.gin --gin_file=gin/runs/chat_sft.gin ... \\
        --gin.infer.chat_file=\\"chats.jsonl\\" --gin.infer.output_path=\\"answers.jsonl\\"

Input file: `.jsonl` (one JSON object per line: "inputs", and "targets" to score) or any other
extension (one input text per line), encoded with the vocabulary the model was trained with (its
MODEL_DIR/vocabulary.json; t5lite's default vocabulary if there is none). Malformed lines are all
reported, with line numbers, before any compute. Output: one JSON object per example, in input
order: {"index", "inputs", "prediction", "score"} (predict) or {"index", "inputs", "targets",
"score"} (score: log-likelihood of targets).
Chat file (chat_file, predict only): conversations, JSONL {"messages": [{"role", "content"}, ...]}
each ending with a user turn, prompted with the gin-bound ChatTemplate (t5lite/data/chat.py: the
turns, then the open assistant marker) as the model was trained; the answer ends at EOS. "inputs"
is the rendered prompt; a prompt longer than the inputs length loses its oldest tokens.
Resumable: records already in output_path are kept and their examples skipped. Batches are
decoded data-parallel over the mesh's data axes; with several processes (--coordinator_address
etc., or a TPU VM slice) every process reads all examples, decodes its share of each batch, and
process 0 writes output_path.
"""

from __future__ import annotations

if __name__ == "__main__":
    import sys

    from t5lite import host_memory

    host_memory.restart_with_tunables("-m", "t5lite.infer")  # faster malloc on CPU; see host_memory
    from t5lite import infer as _infer_module  # register gin configurables once, not as __main__.*

    sys.exit(_infer_module.main())

import contextlib
import dataclasses
import json
import os
import sys
from collections.abc import Mapping, Sequence

import gin
import jax
import numpy as np
import seqio
import tensorflow as tf

from t5lite import checkpoints, distributed, evaluation, gin_cli, inference, partitioning, run_dir, trainer
from t5lite.data import chat, pipeline, sources, vocab_record
from t5lite.data.vocab import get_default_vocabulary
from t5lite.errors import UserError, reports_user_errors
from t5lite.model.config import TransformerConfig
from t5lite.model.decoding import DecodeConfig
from t5lite.model.models import Model
from t5lite.summaries import Progress, stops_on_interrupt

MODES = ("predict", "score")


@dataclasses.dataclass(frozen=True)
class Example:
    inputs: str
    targets: str = ""
    input_ids: tuple[int, ...] | None = None  # the tokens of `inputs` where they are not its encoding (chat)


def read_input_file(path: str, *, needs_targets: bool) -> list[Example]:
    """Examples of a JSONL or plain-text file; every malformed line is reported in one UserError."""
    if not os.path.isfile(path):
        raise UserError(f"Input file {path!r} does not exist.")
    is_jsonl = path.endswith(".jsonl")
    if needs_targets and not is_jsonl:
        raise UserError(f"Scoring needs targets: give a .jsonl file with 'inputs' and 'targets' (got {path!r}).")
    examples, errors = [], []
    with open(path, encoding="utf-8") as f:
        for line_number, line in enumerate(f, start=1):
            if not line.strip():
                continue  # blank lines separate nothing and are skipped
            if not is_jsonl:
                examples.append(Example(inputs=line.rstrip("\n")))
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                errors.append(f"line {line_number}: not JSON ({e.msg})")
                continue
            keys = ("inputs", "targets") if needs_targets else ("inputs",)
            problems = [k for k in keys if not isinstance(record, dict) or not isinstance(record.get(k), str)]
            if problems:
                errors.append(f"line {line_number}: needs a JSON object with string field(s) {', '.join(problems)}")
                continue
            examples.append(Example(inputs=record["inputs"], targets=record.get("targets", "")))
    if errors:
        shown = "\n  ".join(errors[:20]) + ("\n  ..." if len(errors) > 20 else "")
        raise UserError(f"{path}: {len(errors)} malformed line(s):\n  {shown}")
    if not examples:
        raise UserError(f"{path}: no examples.")
    return examples


def read_chat_file(path: str, vocabulary: seqio.Vocabulary) -> list[Example]:
    """The conversations of a chat JSONL file as prompts; the first bad row fails with file:line."""
    if not os.path.isfile(path):
        raise UserError(f"infer.chat_file {path!r} does not exist.")
    rows = sources.read_jsonl(path, check=lambda row: chat.check_messages(row, to_answer=True))
    if not rows:
        raise UserError(f"{path}: no conversations.")
    template = chat.ChatTemplate()
    return [Example(inputs=template.render(row["messages"]), input_ids=tuple(
        chat.prompt_tokens(template, row["messages"], vocabulary.encode, vocabulary.eos_id))) for row in rows]


def get_task(task_name: str) -> seqio.Task:
    pipeline.list_tasks_of(task_name)  # an unknown name fails here, with close matches
    task = seqio.get_mixture_or_task(task_name)
    if not isinstance(task, seqio.Task):
        raise UserError(f"{task_name!r} is a Mixture; infer reads one Task (pick one of its tasks).")
    return task


def read_task(
    task: seqio.Task, split: str, lengths: Mapping[str, int], seed: int
) -> tuple[list[Example], seqio.Vocabulary]:
    """The (decoded) examples of a task's split, in order, and the task's vocabulary.

    `seed` fixes the random preprocessing (e.g. span corruption's noise): without it every run,
    and every process of one run, would read different examples."""
    vocabulary = task.output_features["targets"].vocabulary
    dataset = task.get_dataset(sequence_length=dict(lengths), split=split, shuffle=False, num_epochs=1, seed=seed)
    examples = [Example(inputs=vocabulary.decode(ex["inputs"].tolist()) if "inputs" in ex else "",
                        targets=vocabulary.decode(ex["targets"].tolist()))
                for ex in dataset.as_numpy_iterator()]
    return examples, vocabulary


def _check_output_path(output_path: str) -> None:
    """Creates output_path's directory; a path that cannot be a file there is a UserError, before decoding."""
    try:
        os.makedirs(os.path.dirname(os.path.abspath(output_path)), exist_ok=True)
        with open(output_path, "a", encoding="utf-8"):
            pass
    except OSError as e:
        raise UserError(f"infer.output_path {output_path!r} cannot be written ({e.strerror}): choose a file path "
                        "whose directories are directories.") from e


def completed_records(output_path: str) -> int:
    """Complete JSON lines already in output_path; a torn last line (a killed run) is cut off."""
    if not os.path.exists(output_path):
        return 0
    with open(output_path, "rb") as f:
        lines = f.read().split(b"\n")
    complete = []
    for line in lines:
        try:
            json.loads(line)
        except json.JSONDecodeError:
            break
        complete.append(line)
    with open(output_path, "wb") as f:
        f.write(b"".join(line + b"\n" for line in complete))
    return len(complete)


def _model_features(examples: Sequence[Example], vocabulary: seqio.Vocabulary, model: Model,
                    lengths: Mapping[str, int]) -> tf.data.Dataset:
    """Enumerated, unpacked model features (the seqio feature converter of evaluation)."""
    eos = vocabulary.eos_id

    def tokens(text: str, length: int) -> np.ndarray:
        return np.array(vocabulary.encode(text)[: length - 1] + [eos], np.int32)

    def input_tokens(example: Example, length: int) -> np.ndarray:
        if example.input_ids is None:
            return tokens(example.inputs, length)
        return np.array(example.input_ids[-length:], np.int32)  # a chat keeps its latest turns and its EOS

    has_inputs = "inputs" in lengths
    rows = {"targets": [tokens(e.targets, lengths["targets"]) if e.targets else np.zeros(0, np.int32)
                        for e in examples]}
    if has_inputs:
        rows["inputs"] = [input_tokens(e, lengths["inputs"]) for e in examples]
    dataset = tf.data.Dataset.from_generator(
        lambda: ({k: v[i] for k, v in rows.items()} for i in range(len(examples))),
        output_signature={k: tf.TensorSpec([None], tf.int32) for k in rows})
    converter = evaluation.eval_feature_converter(model, has_inputs)
    return converter(dataset, dict(lengths)).enumerate()


@gin.configurable
def infer(
    *,
    checkpoint_path: str = gin.REQUIRED,
    output_path: str = gin.REQUIRED,
    input_file: str | None = None,
    chat_file: str | None = None,
    task_name: str | None = None,
    split: str = "validation",
    mode: str = "predict",
    task_feature_lengths: Mapping[str, int] = {"inputs": 128, "targets": 32},  # noqa: B006
    batch_size: int = 8,
    num_examples: int | None = None,
    partitioning_preset: str = "dp",
    seed: int = 0,
    prefix_lm: bool = False,
) -> str:
    """Writes (or completes) output_path; -> its path. Give input_file, chat_file or task_name.

    prefix_lm: a decoder-only model was trained as a prefix LM (DataConfig.prefix_lm=True): its prompt
    is attended both ways when decoding and scoring; False: causally, as a causal LM was trained."""
    if mode not in MODES:
        raise UserError(f"infer.mode={mode!r}; choose one of {MODES}.")
    if [input_file, chat_file, task_name].count(None) != 2:
        raise UserError("Give exactly one of infer.input_file, infer.chat_file and infer.task_name.")
    if chat_file is not None and (mode != "predict" or "inputs" not in task_feature_lengths):
        raise UserError("infer.chat_file answers conversations: use infer.mode='predict' and task_feature_lengths "
                        f"with 'inputs' (the prompt) and 'targets' (the answer), got {dict(task_feature_lengths)}.")
    checkpoints_dir, step = checkpoints.resolve_checkpoint_path(checkpoint_path)
    if step is None:
        step = distributed.agree(checkpoints.latest_checkpoint_step(checkpoints_dir))

    model = Model(TransformerConfig())
    model_dir = run_dir.model_dir_of(checkpoints_dir)
    if input_file is not None or chat_file is not None:
        # The vocabulary the model was trained with, if its MODEL_DIR records one.
        vocabulary = vocab_record.trained_vocabulary(model_dir) or get_default_vocabulary()
        examples = (read_input_file(input_file, needs_targets=mode == "score") if input_file is not None
                    else read_chat_file(chat_file, vocabulary))
        lengths = dict(task_feature_lengths)
    else:
        task = get_task(task_name)
        lengths = {k: v for k, v in task_feature_lengths.items() if k in task.output_features}
        examples, vocabulary = read_task(task, split, lengths, seed)
    features = {"inputs": seqio.Feature(vocabulary), "targets": seqio.Feature(vocabulary)}
    source = (f"infer.input_file {input_file!r}" if input_file else f"infer.chat_file {chat_file!r}" if chat_file
              else f"task {task_name!r}")
    evaluation.check_vocabulary(model, source, features)
    vocab_record.check(model_dir, source,
                       {k: v for k, v in features.items() if k in lengths})
    examples = examples[:num_examples]

    # Process 0 owns the output; every process decodes the same batches (its share of each).
    is_chief = jax.process_index() == 0
    if is_chief:
        _check_output_path(output_path)
    done = distributed.agree(completed_records(output_path) if is_chief else 0)
    todo = list(enumerate(examples))[done:]  # (index in the whole input, example)
    if is_chief:
        print(f"infer: {len(examples)} examples, {done} already in {output_path}, {len(todo)} to {mode}", flush=True)
    if not todo:
        return output_path

    mesh = partitioning.make_mesh()
    rules = partitioning.axis_rules(partitioning_preset)
    params = checkpoints.restore_params(checkpoints_dir, step, trainer.abstract_params(model, mesh, rules))
    run = inference.BatchInference(
        model, mesh, rules, batch_size=batch_size, bidirectional_prompt=prefix_lm,
        decode_config=dataclasses.replace(DecodeConfig(), max_decode_length=lengths["targets"]))
    if mode == "predict":
        params = run.decode_params(params)

    features = _model_features([e for _, e in todo], vocabulary, model, lengths)
    rng = jax.random.PRNGKey(seed)
    progress = Progress(f"infer ({mode})", total=-(-len(todo) // run.batch_size), enabled=is_chief)
    with open(output_path, "a", encoding="utf-8") if is_chief else contextlib.nullcontext() as out:
        batches = progress.track(evaluation.padded_batches(features, run.batch_size))
        for batch_number, (positions, batch) in enumerate(batches):
            if mode == "predict":
                tokens, scores = run.predict(params, batch, jax.random.fold_in(rng, done + batch_number))
            else:
                scores = run.score(params, batch)
            if not is_chief:
                continue
            for row, position in enumerate(positions):  # row in the batch, position in `todo`
                index, example = todo[int(position)]
                record = {"index": index, "inputs": example.inputs}
                if mode == "predict":
                    record["prediction"] = vocabulary.decode(tokens[row].tolist())
                else:
                    record["targets"] = example.targets
                record["score"] = float(scores[row])
                out.write(json.dumps(record, ensure_ascii=False) + "\n")
            out.flush()  # a killed run resumes after the last whole batch
    return output_path


@stops_on_interrupt("infer: interrupted (Ctrl-C); the records written are kept: the same command resumes after them")
@reports_user_errors
def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    gin_cli.configure(argv, description=__doc__)
    output_path = infer()
    if jax.process_index() == 0:
        print(f"wrote {output_path}", flush=True)
    return 0

"""Multiple-choice tasks scored by likelihood, the way lm-evaluation-harness scores them.

A question is a prompt (or one prompt per choice, for partial scoring as in WinoGrande), its
choices and which of them are right. It becomes one seqio row per choice:

    inputs        the prompt (the harness's doc_to_text, few-shot examples included)
    targets       target_delimiter + choice: the continuation whose log-likelihood is scored,
                  without EOS (the harness's `(context, " " + choice)` request)
    question_id   int, the question's index in its split
    is_correct    int 0 | 1
    choice_length int, len(choice) in characters: acc_norm divides the log-likelihood by it
    category      string (MMLU subject, HellaSwag activity, ...) for per-category figures

metrics.rank_classification (acc, acc_norm, chance, standard errors) and metrics.mc2 read the rows
back through rank_classification_target. Encoder-decoder tasks end their inputs with EOS (as T5 was
pretrained); the "_prefix_lm" twin of each task has no EOS between prompt and continuation, so a
decoder-only model reads one running text as in the harness.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Hashable, Mapping, Sequence

import seqio
import tensorflow as tf

from t5lite.data import metrics, vocab
from t5lite.errors import UserError

TARGET_DELIMITER = " "  # the harness's default target_delimiter
PREFIX_LM_SUFFIX = "_prefix_lm"


@dataclasses.dataclass(frozen=True)
class Question:
    """One multiple-choice item. prompts: one prompt for all choices, or one per choice (partial
    scoring: the choice is in the prompt and `choices` hold the shared continuation). labels: 1 for
    each right choice (exactly one for acc; several for MC2). category: for per-category figures."""

    prompts: tuple[str, ...]
    choices: tuple[str, ...]
    labels: tuple[int, ...]
    category: str = ""
    # acc_norm divides by the length of the harness's doc_to_choice strings: the choices, or for
    # partial scoring the per-choice prompts.
    norm_texts: tuple[str, ...] | None = None

    @classmethod
    def single(cls, prompt: str, choices: Sequence[str], gold: int, category: str = "") -> Question:
        """A question with one prompt and one right choice (index `gold`)."""
        check_label(gold, len(choices), where=f"question {prompt[:40]!r}")
        return cls((prompt,), tuple(choices), tuple(int(i == gold) for i in range(len(choices))), category)


def check_label(label, num_choices: int, *, where: str) -> int:
    """The label as an index into the choices, or a UserError that says what it got."""
    if isinstance(label, bool) or not isinstance(label, int):
        kind = "a string" if isinstance(label, str | bytes) else type(label).__name__
        raise UserError(f"{where}: the label must be an integer index into the {num_choices} choices "
                        f"(0..{num_choices - 1}), got {label!r} ({kind}).")
    if not 0 <= label < num_choices:
        raise UserError(f"{where}: label {label} is not an index into the {num_choices} choices "
                        f"(0..{num_choices - 1}).")
    return label


def rows(questions: Sequence[Question], target_delimiter: str = TARGET_DELIMITER) -> list[dict[str, str | int]]:
    """One row per (question, choice) in the layout of the module docstring."""
    out = []
    for question_id, q in enumerate(questions):
        if len(q.choices) < 1 or len(q.labels) != len(q.choices):
            raise UserError(f"question {question_id}: {len(q.choices)} choices but {len(q.labels)} labels.")
        prompts = q.prompts * len(q.choices) if len(q.prompts) == 1 else q.prompts
        norm_texts = q.norm_texts or q.choices
        for prompt, choice, label, norm_text in zip(prompts, q.choices, q.labels, norm_texts, strict=True):
            out.append({"inputs": prompt, "targets": target_delimiter + choice, "question_id": question_id,
                        "is_correct": int(label), "choice_length": len(norm_text), "category": q.category})
    return out


def keep_last_input_tokens(
    dataset: tf.data.Dataset, sequence_length: Mapping[str, int] | None, output_features: Mapping[str, seqio.Feature]
) -> tf.data.Dataset:
    """Drops the first tokens of inputs longer than sequence_length["inputs"] (less one for EOS):
    seqio would cut the end, the words right before the word to predict or the answer."""
    if not sequence_length or not sequence_length.get("inputs"):
        return dataset
    room = sequence_length["inputs"] - int(output_features["inputs"].add_eos)
    return dataset.map(lambda ex: {**ex, "inputs": ex["inputs"][-room:]}, num_parallel_calls=tf.data.AUTOTUNE)


def _tensor(values: list) -> tf.Tensor:
    dtype = tf.int64 if values and isinstance(values[0], int) else tf.string
    return tf.constant(values, dtype, shape=[len(values)])


def questions_source(questions_fn: Callable[[str], Sequence[Question]], splits: Sequence[str],
                     cache_key: Callable[[], Hashable] = lambda: None,
                     target_delimiter: str = TARGET_DELIMITER) -> seqio.FunctionDataSource:
    """A seqio source of the rows of questions_fn(split); read once per (split, cache_key())."""

    @functools.cache
    def cached(split: str, key) -> list[dict]:
        del key  # questions_fn reads what the key names (a data directory, a few-shot setting)
        return rows(questions_fn(split), target_delimiter)

    def dataset_fn(split: str, shuffle_files: bool, seed: int | None = None) -> tf.data.Dataset:
        records = cached(split, cache_key())
        keys = list(records[0]) if records else ["inputs", "targets"]
        dataset = tf.data.Dataset.from_tensor_slices({k: _tensor([r[k] for r in records]) for k in keys})
        return dataset.shuffle(len(records), seed=seed) if shuffle_files and records else dataset

    return seqio.FunctionDataSource(dataset_fn, splits=tuple(splits))


def add_task(name: str, source: seqio.DataSource, *, inputs_eos: bool, metric_fns: Sequence[Callable] | None = None,
             vocabulary: seqio.Vocabulary | None = None) -> seqio.Task:
    """Registers a scored multiple-choice Task over rows(); registering a name twice returns the first."""
    if name in seqio.TaskRegistry.names():
        return seqio.TaskRegistry.get(name)
    vocabulary = vocabulary or vocab.get_default_vocabulary()
    return seqio.TaskRegistry.add(
        name,
        source=source,
        output_features={"inputs": seqio.Feature(vocabulary, add_eos=inputs_eos),
                         "targets": seqio.Feature(vocabulary, add_eos=False)},  # a continuation: no EOS
        preprocessors=[seqio.preprocessors.tokenize, keep_last_input_tokens, seqio.preprocessors.append_eos_after_trim],
        postprocess_fn=metrics.rank_classification_target,
        metric_fns=list(metric_fns or [metrics.rank_classification]),
    )


def add_task_pair(name: str, source: seqio.DataSource, **kwargs) -> tuple[seqio.Task, seqio.Task]:
    """`name` for encoder-decoder models and `name`_prefix_lm for decoder-only ones (same rows)."""
    return (add_task(name, source, inputs_eos=True, **kwargs),
            add_task(name + PREFIX_LM_SUFFIX, source, inputs_eos=False, **kwargs))


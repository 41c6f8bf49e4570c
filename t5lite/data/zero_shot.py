"""Zero-shot benchmarks of a pretrained model: ARC (multiple choice by likelihood) and LAMBADA.

Data: the downstream data directory ($T5LITE_DATA_DIR or --gin.downstream_data_dir.path; see
downstream.py), test splits only, as shipped (llm-foundry's files; formats and licenses there):
    arc/arc_easy.jsonl, arc/arc_challenge.jsonl   {"query": "Question: ...", "choices": [...], "gold": i}
    lambada_openai/lambada_openai.jsonl           {"context": passage minus last word, "continuation": it}

Tasks (split "test"), registered on import:
    arc_easy, arc_challenge   one row per (question, choice): inputs "Question: ...\\nAnswer:",
                              targets = the choice, int features question_id, is_correct; scored;
                              metric rank_classification (accuracy, length-normalised, chance)
    lambada                   inputs = the passage without its last word, targets = that word;
                              metrics last_word_accuracy (greedy decode, T5 sentinels dropped) and
                              target_perplexity (score)
    arc, zero_shot            mixtures: the two ARC tasks; all three, for one `python -m t5lite.eval` run
    benchmarks                the suite: ARC, LAMBADA and the tasks of benchmarks.py (HellaSwag, MMLU,
                              TruthfulQA, WinoGrande, BoolQ, COPA, Winogender); winogender: its two sets
The tasks above are for encoder-decoder models (inputs end with EOS, as in T5 pretraining).
"<task>_prefix_lm", arc_prefix_lm, zero_shot_prefix_lm and benchmarks_prefix_lm are the same rows for
decoder-only models: no EOS
between prompt and continuation, so the model reads one running text as in lm-evaluation-harness.
Targets never get EOS: a score is log p(continuation | prompt) and nothing else. Inputs longer than
the feature length lose their beginning, not their end (the words the answer depends on).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping

import seqio

from t5lite.data import benchmarks, downstream, metrics, sources, vocab
from t5lite.data import multiple_choice as mc
from t5lite.data.multiple_choice import Question, keep_last_input_tokens

ARC_TASKS = {"arc_easy": "arc_easy.jsonl", "arc_challenge": "arc_challenge.jsonl"}
SPLITS = ("test",)


def _arc_problem(row: dict) -> str | None:
    if not isinstance(row.get("query"), str) or not isinstance(row.get("choices"), list) or not row["choices"]:
        return "needs a string 'query' and a non-empty list 'choices'"
    if not isinstance(row.get("gold"), int) or not 0 <= row["gold"] < len(row["choices"]):
        return f"'gold' must index 'choices' (0..{len(row['choices']) - 1}), got {row.get('gold')!r}"
    return None


def arc_questions(file_name: str, split: str) -> list[Question]:
    """The harness's ARC prompt "Question: {question}\nAnswer:" and choices, one right (gold); the file's
    query is already "Question: ..." (ARC has no ids, and a few question texts repeat)."""
    del split  # the files are ARC's test splits
    rows = sources.read_jsonl(downstream.data_file("arc", file_name), _arc_problem)
    return [Question.single(f"{row['query']}\nAnswer:", row["choices"], row["gold"]) for row in rows]


def _lambada_problem(row: dict) -> str | None:
    if not all(isinstance(row.get(k), str) for k in ("context", "continuation")):
        return "needs string fields 'context' and 'continuation'"
    return None


def lambada_records(split: str) -> list[dict[str, str]]:
    del split  # the file is LAMBADA's test split
    rows = sources.read_jsonl(downstream.data_file("lambada_openai", "lambada_openai.jsonl"), _lambada_problem)
    return [{"inputs": row["context"], "targets": row["continuation"]} for row in rows]


def without_sentinels(text: str, example: Mapping | None = None, is_target: bool = False) -> str:
    """seqio postprocess_fn of lambada: drops T5 sentinels (<extra_id_N>) from a prediction, since a
    span-corruption model answers "<extra_id_0> word ..." (the missing span after its marker)."""
    del example
    return text if is_target else re.sub(r"<extra_id_\d+>", " ", text)


def _add_task(name: str, records_fn, *, inputs_eos: bool, metric_fns, postprocess_fn=None) -> None:
    if name in seqio.TaskRegistry.names():
        return
    vocabulary = vocab.get_default_vocabulary()
    seqio.TaskRegistry.add(
        name,
        source=downstream.records_source(records_fn, SPLITS),
        output_features={"inputs": seqio.Feature(vocabulary, add_eos=inputs_eos),
                         "targets": seqio.Feature(vocabulary, add_eos=False)},
        preprocessors=[seqio.preprocessors.tokenize, keep_last_input_tokens, seqio.preprocessors.append_eos_after_trim],
        postprocess_fn=postprocess_fn,
        metric_fns=metric_fns,
    )


SUITE = (*ARC_TASKS, "lambada", *benchmarks.BENCHMARKS)


def register_zero_shot_tasks() -> None:
    for suffix, inputs_eos in (("", True), (mc.PREFIX_LM_SUFFIX, False)):
        for task, file_name in ARC_TASKS.items():
            mc.add_task(f"{task}{suffix}", mc.questions_source(functools.partial(arc_questions, file_name), SPLITS,
                                                               cache_key=downstream.downstream_data_dir),
                        inputs_eos=inputs_eos)
        _add_task(f"lambada{suffix}", lambada_records, inputs_eos=inputs_eos,
                  metric_fns=[metrics.last_word_accuracy, metrics.target_perplexity], postprocess_fn=without_sentinels)
        for mixture, members in ((f"arc{suffix}", ARC_TASKS), (f"zero_shot{suffix}", (*ARC_TASKS, "lambada")),
                                 (f"winogender{suffix}", ("winogender_female", "winogender_male")),
                                 (f"benchmarks{suffix}", SUITE)):
            if mixture not in seqio.MixtureRegistry.names():
                seqio.MixtureRegistry.add(mixture, [f"{t}{suffix}" for t in members], default_rate=1.0)


register_zero_shot_tasks()

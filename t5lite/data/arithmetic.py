"""A generated arithmetic task: "12+7=" -> "19". Prompts for RL from a checkable reward (GRPO,
t5lite.rewards) and supervised data to give a model a start on them.

Registered on import (import t5lite.data.arithmetic in a gin file):

    arithmetic   a+b and a-b (a >= b), operands 0..19: 610 distinct problems, 100 of them held out as
                 "validation" (never in "train"); metric: exact-match accuracy of the decoded answer

add_arithmetic_task registers other ranges and operators. The problems are a fixed function of the
seed: the same on every host and every run.
"""

from __future__ import annotations

import random
import re

import numpy as np
import seqio
import tensorflow as tf

from t5lite.data import metrics, tasks

OPERATORS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}
_PROMPT = re.compile(r"^\s*(\d+)\s*([-+*])\s*(\d+)\s*=\s*$")
_INTEGER = re.compile(r"^\s*(-?\d+)\s*$")


def prompt_text(a: int, operator: str, b: int) -> str:
    return f"{a}{operator}{b}="


def answer_of(prompt: str) -> int | None:
    """The answer to a prompt "a<op>b=" (None: not an arithmetic prompt)."""
    match = _PROMPT.match(prompt)
    if match is None:
        return None
    a, operator, b = match.groups()
    return OPERATORS[operator](int(a), int(b))


def parse_integer(completion: str) -> int | None:
    """The integer a completion states, if it is one and nothing else (spaces aside)."""
    match = _INTEGER.match(completion)
    return int(match.group(1)) if match else None


def problems(*, max_operand: int, operators: str, num_validation: int, seed: int) -> dict[str, list[dict[str, str]]]:
    """{"train": [...], "validation": [...]} of {"inputs": prompt, "targets": answer}: every problem with
    operands 0..max_operand (subtraction: a >= b, so no answer is negative), shuffled by `seed`, the
    first num_validation held out."""
    rows = [(a, op, b) for op in operators for a in range(max_operand + 1) for b in range(max_operand + 1)
            if op != "-" or a >= b]
    random.Random(seed).shuffle(rows)
    records = [{"inputs": prompt_text(a, op, b), "targets": str(OPERATORS[op](a, b))} for a, op, b in rows]
    return {"validation": records[:num_validation], "train": records[num_validation:]}


def _source(records: dict[str, list[dict[str, str]]]) -> seqio.FunctionDataSource:
    def dataset_fn(split: str, shuffle_files: bool, seed: int | None = None) -> tf.data.Dataset:
        rows = records[split]
        dataset = tf.data.Dataset.from_tensor_slices({k: np.array([r[k] for r in rows]) for k in ("inputs", "targets")})
        return dataset.shuffle(len(rows), seed=seed) if shuffle_files else dataset

    return seqio.FunctionDataSource(dataset_fn, splits=tuple(records))


def add_arithmetic_task(name: str, *, max_operand: int = 19, operators: str = "+-", num_validation: int = 100,
                        seed: int = 0) -> seqio.Task:
    """Registers `name`: prompts "a<op>b=" -> the answer, exact-match accuracy as its metric."""
    if unknown := set(operators) - set(OPERATORS):
        raise ValueError(f"operators {sorted(unknown)}: choose among {sorted(OPERATORS)}.")
    records = problems(max_operand=max_operand, operators=operators, num_validation=num_validation, seed=seed)
    return tasks.add_supervised_task(name, _source(records), inputs_field="inputs", targets_field="targets",
                                     metric_fns=[metrics.accuracy])


add_arithmetic_task("arithmetic")

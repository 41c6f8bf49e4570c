"""Reward functions for GRPO (t5lite.grpo): f(prompts: list[str], completions: list[str]) -> list[float],
one reward per completion (TRL's reward-function interface without its keyword arguments).

GRPOConfig.rewards names them: a registered name below, or "module:function" for your own (a class
there is instantiated with no arguments, so gin can configure it). Shipped:

    arithmetic_exact     1 if the completion is the answer to the arithmetic prompt (t5lite/data/arithmetic.py), else 0
    arithmetic_format    1 if the completion is an integer and nothing else, else 0
    arithmetic_partial   1 / (1 + |completion - answer|) for an integer completion, else 0: credit for being
                         close, so a model that never gets one right still gets a signal
    classifier           a fine-tuned t5lite checkpoint's log-probability of a label for the completion
                         (ClassifierReward: e.g. "positive" from an SST-2 classifier)

Register your own with @register("name").
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Sequence
from typing import Any

import gin
import jax
import numpy as np

from t5lite import checkpoints, rollouts, run_dir
from t5lite.data import arithmetic, vocab_record
from t5lite.data.vocab import get_default_vocabulary
from t5lite.errors import UserError
from t5lite.model.config import TransformerConfig
from t5lite.model.models import Model

RewardFn = Callable[[list[str], list[str]], list[float]]
REWARDS: dict[str, Any] = {}  # name -> a reward function, or a class whose instances are one


def register(name: str) -> Callable[[Any], Any]:
    """Decorator: registers a reward function (or a class of them) under `name`."""
    def add(fn):
        REWARDS[name] = fn
        return fn
    return add


def resolve(name: str) -> RewardFn:
    """A reward function from a registered name or "module:function" (a class: one instance of it)."""
    if ":" in name:
        module_name, _, attribute = name.partition(":")
        try:
            found = getattr(importlib.import_module(module_name), attribute)
        except (ImportError, AttributeError) as e:
            raise UserError(f"GRPOConfig.rewards: cannot load {name!r} ({e}); write 'package.module:function', "
                            "importable from the directory you run in.") from e
    elif name in REWARDS:
        found = REWARDS[name]
    else:
        raise UserError(f"GRPOConfig.rewards: unknown reward {name!r}; registered: {sorted(REWARDS)}, or write "
                        "'package.module:function'.")
    return found() if isinstance(found, type) else found


@register("arithmetic_exact")
def arithmetic_exact(prompts: list[str], completions: list[str]) -> list[float]:
    out = []
    for prompt, completion in zip(prompts, completions, strict=True):
        stated = arithmetic.parse_integer(completion)
        out.append(float(stated is not None and stated == arithmetic.answer_of(prompt)))
    return out


@register("arithmetic_format")
def arithmetic_format(prompts: list[str], completions: list[str]) -> list[float]:
    del prompts
    return [float(arithmetic.parse_integer(c) is not None) for c in completions]


@register("arithmetic_partial")
def arithmetic_partial(prompts: list[str], completions: list[str]) -> list[float]:
    out = []
    for prompt, completion in zip(prompts, completions, strict=True):
        stated, answer = arithmetic.parse_integer(completion), arithmetic.answer_of(prompt)
        out.append(0.0 if stated is None or answer is None else 1.0 / (1.0 + abs(stated - answer)))
    return out


@register("classifier")
@gin.configurable
class ClassifierReward:
    """The log-probability that a fine-tuned t5lite model gives `label` for template.format(prompt=...,
    completion=...), e.g. an SST-2 classifier's "positive" for "sst2 sentence: {completion}". With
    `labels` (e.g. ["positive", "negative"]) the reward is instead the probability of `label` among them.

    checkpoint_path: MODEL_DIR/checkpoints/<step> of the classifier (a LoRA run's merged first by
    t5lite.finetune). Its model is TransformerConfig as configured in gin, scoped "reward_model" where
    it differs from the policy's (e.g. reward_model/TransformerConfig.num_decoder_layers = 4); its
    vocabulary the one its run recorded. lengths: the classifier's {"inputs", "targets"} (texts are cut)."""

    def __init__(self, checkpoint_path: str = gin.REQUIRED, template: str = "{completion}", label: str = "positive",
                 labels: Sequence[str] = (), lengths: dict[str, int] | None = None, batch_size: int = 64):
        if labels and label not in labels:
            raise UserError(f"ClassifierReward.label {label!r} is not among ClassifierReward.labels {list(labels)}.")
        self.checkpoint_path, self.template, self.label = checkpoint_path, template, label
        self.labels = tuple(labels) or (label,)
        self.lengths = dict(lengths or {"inputs": 64, "targets": 4})
        self.batch_size = batch_size
        self._loaded = None

    def _load(self):
        if self._loaded is None:
            with gin.config_scope("reward_model"):
                model = Model(TransformerConfig())
            params = checkpoints.read_params(self.checkpoint_path)
            if "lora" in params:
                raise UserError(f"{self.checkpoint_path} is a LoRA run's checkpoint: merge it first with "
                                "`python -m t5lite.finetune` and give the merged checkpoint.")
            vocabulary = (vocab_record.trained_vocabulary(run_dir.model_dir_of(self.checkpoint_path))
                          or get_default_vocabulary())
            self._loaded = (model, jax.device_put(params), vocabulary, jax.jit(model.score_batch))
        return self._loaded

    def label_logps(self, prompts: list[str], completions: list[str]) -> np.ndarray:
        """log p(label | template text) [completions, labels] under the classifier."""
        model, params, vocabulary, score_batch = self._load()
        eos = vocabulary.eos_id
        texts = [self.template.format(prompt=p, completion=c) for p, c in zip(prompts, completions, strict=True)]
        inputs = [list(vocabulary.encode(t))[: self.lengths["inputs"] - 1] + [eos] for t in texts]
        answers = [list(vocabulary.encode(label))[: self.lengths["targets"] - 1] + [eos] for label in self.labels]
        pairs = [(i, a) for i in inputs for a in answers]  # each text with each label
        logps = []
        for start in range(0, len(pairs), self.batch_size):
            chunk = pairs[start:start + self.batch_size]
            padded = chunk + [chunk[-1]] * (self.batch_size - len(chunk))  # one compiled shape
            rows = rollouts.answer_features([p for p, _ in padded], [a for _, a in padded], self.lengths,
                                            encoder_decoder=model.config.is_encoder_decoder)
            logps.extend(np.asarray(score_batch(params, rows))[: len(chunk)].tolist())
        return np.asarray(logps, np.float64).reshape(len(texts), len(self.labels))

    def __call__(self, prompts: list[str], completions: list[str]) -> list[float]:
        logps = self.label_logps(prompts, completions)
        if len(self.labels) == 1:
            return logps[:, 0].tolist()
        index = self.labels.index(self.label)
        return [math.exp(row[index] - np.logaddexp.reduce(row)) for row in logps]

"""K-fold cross-validation splits of a task's data, read through split names.

    kfold(n, k, seed)                       -> k disjoint index arrays covering range(n)
    kfold(n, k, seed, labels=labels)        -> the same, each fold with the data's label ratios

A task registered with tasks.add_supervised_task (its source a sources.FoldedSource) reads fold
splits of any of its splits:

    train[fold=2/5]                  the training part of fold 2 of 5: split "train" less fold 2
    train[fold=2/5,heldout]          fold 2 itself, the part to evaluate on
    train[fold=2/5,stratified]       folds that keep the label (targets) ratios of "train"
    train[fold=2/5,seed=7]           another assignment of rows to folds (default seed 0)

e.g. --gin.DataConfig.split="'train[fold=2/5]'" --gin.EvalConfig.split="'train[fold=2/5,heldout]'";
`python -m t5lite.sweep --cv_folds=5` sets both for each fold. The five training parts of a seed
together see every row four times, the held-out parts every row once. This module needs numpy
only (the sweep formats split names without loading TensorFlow).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence

import numpy as np

from t5lite.errors import UserError

_FOLD_SPLIT = re.compile(r"^(?P<base>[^\[\]]+)\[fold=(?P<index>\d+)/(?P<folds>\d+)(?P<options>(,[^,\[\]]+)*)\]$")


def kfold(n: int, k: int, seed: int = 0, labels: Sequence | None = None) -> list[np.ndarray]:
    """k disjoint, sorted int64 index arrays whose union is range(n), deterministic from `seed`.

    Rows are shuffled and dealt to the folds in turn, so fold sizes differ by at most one. With
    `labels` (one a row) each label's rows are dealt separately, continuing the turn, so every fold
    holds each label's count / k rows (rounded up or down): the label ratios of the whole.
    """
    if k < 2:
        raise UserError(f"k-fold needs at least 2 folds, got {k}.")
    if n < k:
        raise UserError(f"{n} rows cannot make {k} non-empty folds.")
    rng = np.random.default_rng(seed)
    fold_of = np.empty(n, np.int64)
    if labels is None:
        groups = [np.arange(n)]
    else:
        labels = np.asarray(labels)
        if len(labels) != n:
            raise UserError(f"{len(labels)} labels for {n} rows.")
        groups = [np.flatnonzero(labels == value) for value in np.unique(labels)]
    turn = 0
    for rows in groups:
        rows = rng.permutation(rows)
        fold_of[rows] = (turn + np.arange(len(rows))) % k
        turn = (turn + len(rows)) % k
    return [np.flatnonzero(fold_of == i) for i in range(k)]


@dataclasses.dataclass(frozen=True)
class FoldSplit:
    """A split name such as 'train[fold=2/5,stratified,heldout]', parsed."""

    base: str
    index: int
    folds: int
    heldout: bool = False
    stratified: bool = False
    seed: int = 0

    @classmethod
    def parse(cls, name: str) -> FoldSplit | None:
        """The fold split `name` names, or None for a plain split name; a malformed one fails."""
        if "[" not in name:
            return None
        match = _FOLD_SPLIT.match(name)
        if not match:
            raise UserError(f"Split {name!r}: write SPLIT[fold=K/N] with options ',heldout', ',stratified', "
                            "',seed=S', e.g. 'train[fold=0/5,heldout]'.")
        options = {"heldout": False, "stratified": False, "seed": 0}
        for option in filter(None, match["options"].split(",")):
            key, _, value = option.strip().partition("=")
            if key in ("heldout", "stratified") and not value:
                options[key] = True
            elif key == "seed" and re.fullmatch(r"\d+", value):
                options["seed"] = int(value)
            else:
                raise UserError(f"Split {name!r}: unknown option {option!r}; use heldout, stratified or seed=S.")
        split = cls(match["base"], int(match["index"]), int(match["folds"]), **options)
        if not 0 <= split.index < split.folds or split.folds < 2:
            raise UserError(f"Split {name!r}: the fold must be 0..N-1 of N >= 2 folds.")
        return split

    def __str__(self) -> str:
        options = ([f"seed={self.seed}"] if self.seed else []) + (["stratified"] if self.stratified else []) \
            + (["heldout"] if self.heldout else [])
        return f"{self.base}[fold={self.index}/{self.folds}{''.join(',' + o for o in options)}]"

    def rows(self, n: int, labels: Sequence | None = None) -> np.ndarray:
        """Indices of the rows of the base split (n of them) this split reads, sorted."""
        folds = kfold(n, self.folds, self.seed, labels if self.stratified else None)
        if self.heldout:
            return folds[self.index]
        return np.sort(np.concatenate([f for i, f in enumerate(folds) if i != self.index]))


class FoldSplits(tuple):
    """A source's split names; `in` also accepts the fold splits of each of them, so seqio and the
    pipeline's split checks accept 'train[fold=0/5]' wherever 'train' is a split."""

    def __contains__(self, name: object) -> bool:
        if tuple.__contains__(self, name):
            return True
        try:
            split = FoldSplit.parse(name) if isinstance(name, str) else None
        except UserError:
            return False
        return split is not None and tuple.__contains__(self, split.base)

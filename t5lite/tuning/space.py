"""Search spaces over gin bindings, written the way the sweep's flags take them.

    --grid="make_schedule.learning_rate=[0.1, 0.3, 1.0]"        every combination of the listed values
    --random="NAME=DIST" / --bayes="NAME=DIST", DIST one of      sampled: seeded, or by Optuna's TPE
        uniform(a, b)      a float in [a, b]
        loguniform(a, b)   a float in [a, b], uniform in log(x)  (learning rates)
        int(a, b)          an int in a..b, both included
        choice([v, ...])   one of the values: any Python literal gin reads (strings, lists, dicts)

A Param is one binding and its distribution. Listed values (grid, choice) are kept as their gin
source text, e.g. "0.3" or "{'inputs': 64, 'targets': 16}", so any value gin reads can be swept and
stored in the study; floats and ints are kept as numbers.
"""

from __future__ import annotations

import ast
import dataclasses
import itertools
import math
import random
from collections.abc import Mapping, Sequence

import optuna

from t5lite.errors import UserError

KINDS = ("uniform", "loguniform", "int", "choice")


def gin_value(value: object) -> str:
    """A Python value as gin source (strings quoted, floats exact)."""
    return repr(value)


@dataclasses.dataclass(frozen=True)
class Param:
    """One gin binding (e.g. 'make_schedule.learning_rate') and the values a trial may give it."""

    name: str
    kind: str  # one of KINDS
    low: float = 0.0
    high: float = 0.0
    choices: tuple[str, ...] = ()  # choice: each value's gin source

    @property
    def log(self) -> bool:
        return self.kind == "loguniform"

    def suggest(self, trial: optuna.Trial) -> object:
        """The trial's value: its fixed one (grid, random, a retry), else the sampler's."""
        if self.kind == "choice":
            return trial.suggest_categorical(self.name, self.choices)
        if self.kind == "int":
            return trial.suggest_int(self.name, int(self.low), int(self.high))
        return trial.suggest_float(self.name, self.low, self.high, log=self.log)

    def gin_source(self, value: object) -> str:
        """The binding's right-hand side for a value of this param."""
        return str(value) if self.kind == "choice" else gin_value(value)

    def python_value(self, value: object) -> object:
        """A value as Python (a choice's gin source read back), for plotting."""
        if self.kind != "choice":
            return value
        try:
            return ast.literal_eval(str(value))
        except (ValueError, SyntaxError):
            return str(value)


def _split_spec(spec: str, flag: str) -> tuple[str, str]:
    name, sep, rest = spec.partition("=")
    if not sep or not name.strip() or not rest.strip():
        raise UserError(f"{flag} {spec!r}: write NAME=VALUES, NAME a gin binding such as make_schedule.learning_rate.")
    return name.strip(), rest.strip()


def parse_grid(specs: Sequence[str]) -> list[Param]:
    """["NAME=[v1, v2]", ...] -> one choice Param per spec, its values in the listed order."""
    params = []
    for spec in specs:
        name, values = _split_spec(spec, "--grid")
        try:
            parsed = ast.literal_eval(values)
        except (ValueError, SyntaxError) as e:
            raise UserError(f"--grid {spec!r}: the values must be a Python list literal ({e}).") from e
        if not isinstance(parsed, list) or not parsed:
            raise UserError(f"--grid {spec!r}: write NAME=[value, ...] with at least one value.")
        params.append(Param(name, "choice", choices=tuple(dict.fromkeys(gin_value(v) for v in parsed))))
    _check_unique(params, "--grid")
    return params


def grid_points(params: Sequence[Param]) -> list[dict[str, str]]:
    """Every combination of the grid's values, the first param varying slowest."""
    return [dict(zip([p.name for p in params], combo, strict=True))
            for combo in itertools.product(*(p.choices for p in params))]


def parse_distributions(specs: Sequence[str], flag: str) -> list[Param]:
    """["NAME=loguniform(a, b)", "NAME=int(a, b)", "NAME=choice([...])", ...] -> Params."""
    params = []
    for spec in specs:
        name, dist = _split_spec(spec, flag)
        kind, paren, args = dist.partition("(")
        kind = kind.strip()
        if kind not in KINDS or not paren or not args.endswith(")"):
            raise UserError(f"{flag} {spec!r}: use uniform(a, b), loguniform(a, b), int(a, b) or choice([...]).")
        try:
            values = ast.literal_eval(f"({args}")
        except (ValueError, SyntaxError) as e:
            raise UserError(f"{flag} {spec!r}: could not read the arguments ({e}).") from e
        if kind == "choice":
            if not isinstance(values, list) or not values:
                raise UserError(f"{flag} {spec!r}: write choice([value, ...]) with at least one value.")
            params.append(Param(name, kind, choices=tuple(dict.fromkeys(gin_value(v) for v in values))))
            continue
        numbers = (int,) if kind == "int" else (int, float)
        if not (isinstance(values, tuple) and len(values) == 2 and all(
                isinstance(v, numbers) and not isinstance(v, bool) for v in values)):
            raise UserError(f"{flag} {spec!r}: {kind}(low, high) takes two {'ints' if kind == 'int' else 'numbers'}.")
        low, high = values
        if low > high or (low == high and kind != "int"):
            raise UserError(f"{flag} {spec!r}: low must be below high.")
        if kind == "loguniform" and low <= 0:
            raise UserError(f"{flag} {spec!r}: loguniform needs 0 < low.")
        params.append(Param(name, kind, low, high) if kind == "int" else Param(name, kind, float(low), float(high)))
    _check_unique(params, flag)
    return params


def sample_random(params: Sequence[Param], trials: int, seed: int) -> list[dict[str, object]]:
    """`trials` samples of the params, each a {name: value}; the first n of any longer list are the
    same (one random stream, drawn trial by trial), so a sweep can be extended by raising --trials."""
    rng = random.Random(seed)

    def draw(p: Param) -> object:
        if p.kind == "choice":
            return rng.choice(p.choices)
        if p.kind == "int":
            return rng.randint(int(p.low), int(p.high))
        if p.kind == "uniform":
            return rng.uniform(p.low, p.high)
        return min(max(math.exp(rng.uniform(math.log(p.low), math.log(p.high))), p.low), p.high)

    return [{p.name: draw(p) for p in params} for _ in range(trials)]


def describe(params: Sequence[Param]) -> list[Mapping[str, object]]:
    """The space as plain data (stored with the study, to recognise the same sweep when it resumes)."""
    return [dataclasses.asdict(p) | {"choices": list(p.choices)} for p in params]


def _check_unique(params: Sequence[Param], flag: str) -> None:
    names = [p.name for p in params]
    if len(set(names)) != len(names):
        raise UserError(f"{flag}: {sorted({n for n in names if names.count(n) > 1})} given more than once.")

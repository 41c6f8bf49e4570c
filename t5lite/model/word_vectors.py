"""The token embedding initialised from word vectors (TransformerConfig.embedding_init_file).

The file is word2vec's or GloVe's text format: an optional header line "count dim" (word2vec), then one
line per word, the word and its dim values separated by spaces. Its dim must be emb_dim.

Vocabulary piece i gets the vector of its word: the piece without SentencePiece's word-start mark "▁",
exactly, else in lower case ("▁The" -> "The", else "the"). Pieces without a vector, special pieces
(given as ""), and the embedding rows above the vocabulary's size keep the init scheme's values.

The vectors are multiplied by one factor so that the standard deviation of all their values is the init
scheme's embedding std (init_schemes.embedding_stddev): they replace rows of that scale, and pre-trained
vectors often have another (GloVe's entries ~0.4, T5's embedding 1). embedding_init_keep_scale=True keeps
them as they are in the file.

`python -m t5lite.train` applies this when it creates a fresh train state; a resumed run and one whose
params come from CheckpointConfig.initial_checkpoint_path do not.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from t5lite import fileio
from t5lite.errors import UserError
from t5lite.model import init_schemes
from t5lite.model.config import TransformerConfig

WORD_START = "\u2581"  # SentencePiece's "▁", the mark of a piece that starts a word


def candidate_words(piece: str) -> list[str]:
    """The words a piece may have a vector under, in order: its text without "▁", then lower-cased."""
    word = piece.removeprefix(WORD_START)
    if not word:
        return []
    return [word] if word.lower() == word else [word, word.lower()]


def read_word_vectors(path: str, wanted: set[str], dim: int) -> dict[str, np.ndarray]:
    """{word: float32 vector [dim]} for the words of `wanted` that the file at `path` has (first line wins).

    A file whose vectors do not have `dim` values, or a malformed line of a wanted word, is a UserError."""
    name = f"TransformerConfig.embedding_init_file={path!r}"
    vectors: dict[str, np.ndarray] = {}
    try:
        with fileio.open_file(path) as f:
            for number, line in enumerate(f, start=1):
                fields = line.rstrip().split(" ")
                if number == 1 and _is_header(fields):
                    _check_dim(name, int(fields[1]), dim)
                    continue
                if number <= 2 and len(fields) > 1:  # the first vector line tells a headerless file's dim
                    _check_dim(name, len(fields) - 1, dim)
                if fields[0] in wanted and fields[0] not in vectors:
                    vectors[fields[0]] = _parse_vector(name, number, fields, dim)
    except (*fileio.ERRORS, UnicodeDecodeError) as e:
        raise UserError(f"Cannot read {name}: {getattr(e, 'strerror', None) or e} (a UTF-8 text file).") from e
    return vectors


def _is_header(fields: Sequence[str]) -> bool:
    return len(fields) == 2 and all(f.isdigit() for f in fields)


def _check_dim(name: str, file_dim: int, dim: int) -> None:
    if file_dim != dim:
        raise UserError(f"{name} has {file_dim}-dimensional vectors but TransformerConfig.emb_dim={dim}; use "
                        f"vectors of dimension {dim} or set emb_dim={file_dim}.")


def _parse_vector(name: str, number: int, fields: Sequence[str], dim: int) -> np.ndarray:
    try:
        vector = np.asarray(fields[1:], dtype=np.float32)
    except ValueError as e:
        raise UserError(f"{name}, line {number}: {e}; a line is a word and {dim} numbers.") from e
    if vector.shape != (dim,) or not np.all(np.isfinite(vector)):
        raise UserError(f"{name}, line {number}: expected {dim} finite numbers after the word {fields[0]!r}, "
                        f"got {len(fields) - 1}.")
    return vector


def word_vector_table(pieces: Sequence[str], vectors: Mapping[str, np.ndarray], shape: tuple[int, int],
                      stddev: float | None) -> tuple[np.ndarray, int]:
    """(table [vocab rows, dim] float32 with piece i's vector in row i and NaN where it has none, rows filled).

    stddev: the vectors are multiplied by stddev / (the std of all the found vectors' values); None: kept."""
    table = np.full(shape, np.nan, np.float32)
    for i, piece in enumerate(pieces[:shape[0]]):
        word = next((w for w in candidate_words(piece) if w in vectors), None)
        if word is not None:
            table[i] = vectors[word]
    found = ~np.isnan(table[:, 0])
    spread = float(np.std(table[found])) if found.any() else 0.0
    if stddev is not None and spread > 0:
        table[found] *= stddev / spread
    return table, int(found.sum())


def embedding_with_vectors(embedding: jax.Array, table: np.ndarray) -> jax.Array:
    """`embedding` with the rows of `table` that are not NaN, laid out with the embedding's sharding
    (each process builds the same table; every device gets its own part)."""
    vectors = jax.make_array_from_callback(table.shape, embedding.sharding, lambda index: table[index])
    replace = jax.jit(lambda e, v: jnp.where(jnp.isnan(v), e, v), out_shardings=embedding.sharding)
    return replace(embedding, vectors)


def with_word_vectors(params: Any, config: TransformerConfig, pieces: Sequence[str]) -> Any:
    """Params (a fresh init) with the token embedding's rows of config.embedding_init_file; prints the coverage.

    pieces: the vocabulary's piece of each id ("" for special pieces), e.g. t5lite.data.vocab.pieces."""
    embedding = params["token_embedder"]["embedding"]
    wanted = {w for piece in pieces for w in candidate_words(piece)}
    vectors = read_word_vectors(config.embedding_init_file, wanted, config.emb_dim)
    stddev = None if config.embedding_init_keep_scale else init_schemes.embedding_stddev(config)
    table, found = word_vector_table(pieces, vectors, embedding.shape, stddev)
    print(f"embedding rows from word vectors: {found} of {len(pieces)} ({config.embedding_init_file}; "
          f"{'as in the file' if stddev is None else f'rescaled to std {stddev:.4g}'})", flush=True)
    token_embedder = {**params["token_embedder"], "embedding": embedding_with_vectors(embedding, table)}
    return {**params, "token_embedder": token_embedder}

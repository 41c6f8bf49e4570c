"""Decoding and scoring batches on a device mesh, data-parallel, from one process or many.

Every process calls with the same whole batch (all hosts read the same examples in the same
order): the batch is split over the mesh's data axes (data x fsdp), so each device decodes its own
rows and each process places only its own devices' rows; the parameters keep their shardings (a
model sharded with fsdp or tp decodes sharded), and the results come back whole to every process.
t5lite.eval, t5lite.infer and training's inference evaluation run the model through this.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from t5lite import partitioning
from t5lite.model.decoding import DecodeConfig
from t5lite.model.models import Model


class BatchInference:
    """predict / score of `model` on `mesh`, with the model's activation constraints under `rules`."""

    def __init__(self, model: Model, mesh: Mesh, rules, *, batch_size: int, decode_config: DecodeConfig,
                 bidirectional_prompt: bool):
        """bidirectional_prompt: see Model.predict_batch. batch_size is rounded up to a multiple of
        the data-parallel devices (the padded rows are decoded and dropped by the callers)."""
        ways = partitioning.data_parallel_size(mesh)
        self.batch_size = -(-batch_size // ways) * ways
        self.mesh = mesh
        whole = NamedSharding(mesh, PartitionSpec())  # outputs are small: every process gets all rows

        def predict(params, batch, rng):
            return model.predict_batch(params, batch, decode_config, rng, bidirectional_prompt)

        def score(params, batch):
            return model.score_batch(params, batch, bidirectional_prompt)

        self._predict = jax.jit(partitioning.with_sharding_rules(predict, mesh, rules), out_shardings=whole)
        self._score = jax.jit(partitioning.with_sharding_rules(score, mesh, rules), out_shardings=whole)
        self._decode_params = jax.jit(model.decode_params)

    def decode_params(self, params) -> Any:
        """`params` as predict decodes with them (split per layer once, not at every call)."""
        return self._decode_params(params)

    def compile_from_shapes(self, abstract_params, feature_shapes: Mapping[str, tuple[int, ...]]):
        """(decode_params, predict) compiled from shapes alone (ShapeDtypeStructs carrying shardings),
        e.g. for TPU devices on a machine without them (t5lite.precompile)."""
        to_decode_layout = self._decode_params.lower(abstract_params).compile()
        layout = jax.eval_shape(self._decode_params, abstract_params)
        abstract_decode_params = jax.tree_util.tree_map(
            lambda s, sharding: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding),
            layout, to_decode_layout.output_shardings)
        rows = partitioning.batch_sharding(self.mesh)
        batch = {k: jax.ShapeDtypeStruct(shape, np.int32, sharding=rows) for k, shape in feature_shapes.items()}
        rng = jax.ShapeDtypeStruct((2,), np.uint32, sharding=NamedSharding(self.mesh, PartitionSpec()))
        return to_decode_layout, self._predict.lower(abstract_decode_params, batch, rng).compile()

    def predict(self, decode_params, batch: Mapping[str, np.ndarray], rng: jax.Array) -> tuple[np.ndarray, np.ndarray]:
        """-> (tokens [batch, max_decode_length], scores [batch]) for a whole batch of batch_size rows."""
        tokens, scores = self._predict(decode_params, partitioning.global_batch(batch, self.mesh),
                                       partitioning.replicated(rng, self.mesh))
        return np.asarray(tokens), np.asarray(scores)

    def score(self, params, batch: Mapping[str, np.ndarray]) -> np.ndarray:
        """-> log-likelihood of each row's targets [batch]."""
        return np.asarray(self._score(params, partitioning.global_batch(batch, self.mesh)))

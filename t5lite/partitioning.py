"""Mesh, logical-axis rules and sharding helpers.

The model names logical axes (batch, length, embed, mlp, heads, kv, vocab, relpos_buckets,
layers); the rules here map them onto mesh axes (data, fsdp, tensor). A mesh axis is used at
most once per array: flax takes the first rule whose mesh axis is still free, so "embed" shards
parameters over fsdp but stays replicated in activations, whose batch already took fsdp.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import gin
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from t5lite.errors import UserError

MESH_AXES = ("data", "fsdp", "tensor")

RULE_PRESETS: dict[str, tuple[tuple[str, Any], ...]] = {
    # Pure data parallelism: parameters replicated.
    "dp": (("batch", ("data", "fsdp")),),
    # Fully sharded data parallelism: parameters sharded over fsdp along embed (or vocab).
    "fsdp": (
        ("batch", ("data", "fsdp")),
        ("embed", "fsdp"),
        ("vocab", "fsdp"),
    ),
    # Megatron-style tensor parallelism: heads and mlp split over tensor.
    "tp": (
        ("batch", ("data", "fsdp")),
        ("heads", "tensor"),
        ("mlp", "tensor"),
        ("vocab", "tensor"),
    ),
    "fsdp+tp": (
        ("batch", ("data", "fsdp")),
        ("heads", "tensor"),
        ("mlp", "tensor"),
        ("vocab", "tensor"),
        ("embed", "fsdp"),
    ),
}


def axis_rules(preset: str) -> tuple[tuple[str, Any], ...]:
    """Logical->mesh rules of a preset; logical axes without a rule stay replicated."""
    if preset not in RULE_PRESETS:
        raise UserError(f"Unknown partitioning preset {preset!r}; choose one of {sorted(RULE_PRESETS)}.")
    return RULE_PRESETS[preset]


@gin.configurable
def make_mesh(*, data: int = -1, fsdp: int = 1, tensor: int = 1, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A (data, fsdp, tensor) mesh over all devices; one size may be -1 to take the rest."""
    devices = list(devices if devices is not None else jax.devices())
    sizes = [data, fsdp, tensor]
    if sizes.count(-1) > 1:
        raise UserError(f"At most one mesh axis may be -1; got data={data}, fsdp={fsdp}, tensor={tensor}.")
    known = int(np.prod([s for s in sizes if s != -1]))
    if -1 in sizes:
        if len(devices) % known:
            raise UserError(
                f"{len(devices)} devices cannot be split into data={data}, fsdp={fsdp}, tensor={tensor}: "
                f"{len(devices)} is not a multiple of {known}."
            )
        sizes[sizes.index(-1)] = len(devices) // known
    if int(np.prod(sizes)) != len(devices):
        raise UserError(
            f"Mesh data={sizes[0]} x fsdp={sizes[1]} x tensor={sizes[2]} = {int(np.prod(sizes))} devices, "
            f"but {len(devices)} are available. Set one axis to -1 to use all of them."
        )
    # Auto axes: XLA propagates shardings from the logical constraints (jax's Explicit default
    # would demand an out_sharding on every ambiguous op, e.g. the embedding gather).
    return jax.make_mesh(tuple(sizes), MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


def logical_shardings(boxed_tree: Any, mesh: Mesh, rules) -> Any:
    """NamedShardings for a tree of nn.LogicallyPartitioned leaves (e.g. from jax.eval_shape(init))."""
    specs = nn.get_partition_spec(boxed_tree)
    return nn.logical_to_mesh_sharding(specs, mesh, rules)


def derive_state_shardings(state_shapes: Any, params_shapes: Any, params_shardings: Any, mesh: Mesh) -> Any:
    """Shardings for any tree containing params-shaped subtrees (optimizer states).

    Every subtree with the params' structure takes the params' shardings leaf by leaf where the
    shapes match (Adam moments); everything else (counts, factored statistics) is replicated.
    """
    params_def = jax.tree_util.tree_structure(params_shapes)
    replicated = NamedSharding(mesh, PartitionSpec())
    p_shapes = jax.tree_util.tree_leaves(params_shapes)
    p_shardings = jax.tree_util.tree_leaves(params_shardings)

    def is_params_like(x) -> bool:
        try:
            return jax.tree_util.tree_structure(x) == params_def
        except Exception:
            return False

    def assign(subtree):
        if is_params_like(subtree):
            leaves = jax.tree_util.tree_leaves(subtree)
            out = [s if tuple(leaf.shape) == tuple(p.shape) else replicated
                   for leaf, p, s in zip(leaves, p_shapes, p_shardings, strict=True)]
            return jax.tree_util.tree_unflatten(params_def, out)
        return jax.tree_util.tree_map(lambda _: replicated, subtree)

    return jax.tree_util.tree_map(assign, state_shapes, is_leaf=is_params_like)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Batches are split along their first axis over the data-parallel axes."""
    return NamedSharding(mesh, PartitionSpec(("data", "fsdp")))


def shard_batch(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """A host's slice of the global batch -> global jax Arrays sharded over the data axes."""
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}


def sharding_table(boxed_params: Any, shardings: Any) -> list[dict[str, Any]]:
    """One row per parameter: name, shape, logical axes, mesh axes, bytes per device."""
    rows = []
    flat_boxed = jax.tree_util.tree_flatten_with_path(
        boxed_params, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))[0]
    flat_shardings = jax.tree_util.tree_leaves(shardings)
    for (path, boxed), sharding in zip(flat_boxed, flat_shardings, strict=True):
        value = boxed.value if isinstance(boxed, nn.LogicallyPartitioned) else boxed
        names = boxed.names if isinstance(boxed, nn.LogicallyPartitioned) else ()
        shard_shape = sharding.shard_shape(tuple(value.shape))
        rows.append({
            "name": "/".join(str(getattr(k, "key", k)) for k in path),
            "shape": tuple(value.shape),
            "logical_axes": tuple(names),
            "mesh_axes": tuple(sharding.spec),
            "bytes_per_device": int(np.prod(shard_shape)) * np.dtype(value.dtype).itemsize,
        })
    return rows

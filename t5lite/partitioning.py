"""Mesh, logical-axis rules and sharding helpers.

The model names logical axes (batch, length, embed, mlp, heads, kv, vocab, relpos_buckets,
layers); the rules here map them onto mesh axes (data, fsdp, tensor). A mesh axis is used at
most once per array: flax takes the first rule whose mesh axis is still free, so "embed" shards
parameters over fsdp but stays replicated in activations, whose batch already took fsdp.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import gin
import jax
import numpy as np
import optax
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


@gin.configurable(denylist=["preset"])
def axis_rules(preset: str, *, custom_rules: Sequence[tuple[str, Any]] | None = None) -> tuple[tuple[str, Any], ...]:
    """Logical->mesh rules of a preset; logical axes without a rule stay replicated.

    custom_rules, e.g. (("batch", ("data", "fsdp")), ("mlp", "tensor")), replaces the preset
    (gin: axis_rules.custom_rules); each mesh side is a mesh axis, a tuple of them, or None.
    """
    if custom_rules is not None:
        rules = tuple((logical, tuple(m) if isinstance(m, list) else m) for logical, m in custom_rules)
        check_rules(rules)
        return rules
    if preset not in RULE_PRESETS:
        raise UserError(f"Unknown partitioning preset {preset!r}; choose one of {sorted(RULE_PRESETS)}.")
    return RULE_PRESETS[preset]


def check_rules(rules: Sequence[tuple[str, Any]]) -> None:
    """Every rule maps a logical axis name to mesh axes of MESH_AXES (or None)."""
    for rule in rules:
        if len(rule) != 2 or not isinstance(rule[0], str):
            raise UserError(f"Axis rule {rule!r} must be a pair (logical axis name, mesh axes).")
        logical, mesh_axes = rule
        named = mesh_axes if isinstance(mesh_axes, tuple) else (mesh_axes,)
        unknown = [a for a in named if a is not None and a not in MESH_AXES]
        if unknown:
            raise UserError(f"Axis rule {rule!r} names unknown mesh axis {unknown[0]!r}; the mesh axes are "
                            f"{MESH_AXES}.")


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
    """NamedShardings for a tree of nn.LogicallyPartitioned leaves (e.g. from jax.eval_shape(init)).

    Raises UserError naming the parameter if a dimension is not divisible by its mesh axes.
    """
    check_rules(rules)
    specs = nn.get_partition_spec(boxed_tree)
    shardings = nn.logical_to_mesh_sharding(specs, mesh, rules)
    flat_boxed = jax.tree_util.tree_flatten_with_path(
        boxed_tree, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))[0]
    for (path, boxed), sharding in zip(flat_boxed, jax.tree_util.tree_leaves(shardings), strict=True):
        value = boxed.value if isinstance(boxed, nn.LogicallyPartitioned) else boxed
        _check_divisible(_path_name(path), tuple(value.shape), sharding)
    return shardings


def spec_axes(entry: str | Sequence[str] | None) -> tuple[str, ...]:
    """One PartitionSpec entry (None, an axis name or a tuple of them) as a tuple of axis names."""
    return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def mesh_axes_size(mesh: Mesh, entry: str | Sequence[str] | None) -> int:
    """How many devices one PartitionSpec entry splits a dimension over."""
    return int(np.prod([mesh.shape[a] for a in spec_axes(entry)]))


def _check_divisible(name: str, shape: tuple[int, ...], sharding: NamedSharding) -> None:
    spec = tuple(sharding.spec) + (None,) * (len(shape) - len(sharding.spec))
    for dim, (size, entry) in enumerate(zip(shape, spec, strict=True)):
        axes, ways = spec_axes(entry), mesh_axes_size(sharding.mesh, entry)
        if size % ways:
            raise UserError(
                f"Parameter {name} {shape}: dimension {dim} (size {size}) is not divisible by mesh axes "
                f"{axes} ({ways} devices). Change the make_mesh sizes or the partitioning preset, or "
                "choose a model dimension that is a multiple of it."
            )


def _path_name(path) -> str:
    return "/".join(str(getattr(k, "key", k)) for k in path)


def with_sharding_rules(fn: Callable, mesh: Mesh, rules) -> Callable:
    """`fn` traced under `mesh` and the logical axis rules, so the model's activation constraints
    (nn.with_logical_constraint) resolve to mesh axes wherever the jitted function is called."""

    def traced_under_rules(*args):
        # An abstract mesh can be entered inside jit (jax.set_mesh cannot); flax reads it from here.
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), nn.logical_axis_rules(rules):
            return fn(*args)

    return traced_under_rules


def derive_state_shardings(state_shapes: Any, params_shapes: Any, params_shardings: Any, mesh: Mesh) -> Any:
    """Shardings for any tree containing params-shaped subtrees (optimizer states).

    Every subtree with the params' structure takes the params' shardings leaf by leaf: a leaf of
    the param's shape (Adam moments) takes its spec; a leaf of the param's shape with one
    dimension dropped (Adafactor's factored v_row / v_col) takes its spec without that dimension;
    everything else (counts, placeholders) is replicated. A params-shaped subtree may hold
    optax.MaskedNode() for the params a masked / multi_transform optimizer leaves out (frozen ones).
    """
    params_def = jax.tree_util.tree_structure(params_shapes)
    replicated = NamedSharding(mesh, PartitionSpec())
    p_shapes = jax.tree_util.tree_leaves(params_shapes)
    p_shardings = jax.tree_util.tree_leaves(params_shardings)

    def structure(x):  # MaskedNode (no leaves) counted as a leaf, so masked states match the params
        return jax.tree_util.tree_structure(x, is_leaf=_is_masked)

    def is_params_like(x) -> bool:
        try:
            return structure(x) == params_def
        except Exception:
            return False

    def assign(subtree):
        if is_params_like(subtree):
            leaves = jax.tree_util.tree_leaves(subtree, is_leaf=_is_masked)
            out = [leaf if _is_masked(leaf) else _follow_param(tuple(leaf.shape), tuple(p.shape), s, replicated)
                   for leaf, p, s in zip(leaves, p_shapes, p_shardings, strict=True)]
            return jax.tree_util.tree_unflatten(structure(subtree), out)
        return jax.tree_util.tree_map(lambda _: replicated, subtree)

    return jax.tree_util.tree_map(assign, state_shapes, is_leaf=is_params_like)


def _is_masked(x) -> bool:
    return isinstance(x, optax.MaskedNode)


def _follow_param(shape: tuple[int, ...], param_shape: tuple[int, ...], param_sharding: NamedSharding,
                  replicated: NamedSharding) -> NamedSharding:
    """The sharding of an optimizer-state leaf derived from its parameter's, by shape."""
    if shape == param_shape:
        return param_sharding
    spec = tuple(param_sharding.spec) + (None,) * (len(param_shape) - len(param_sharding.spec))
    for dropped in range(len(param_shape)):
        if param_shape[:dropped] + param_shape[dropped + 1:] == shape:
            # Dimensions keep their sizes, so the param's axes still divide them.
            return NamedSharding(param_sharding.mesh, PartitionSpec(*spec[:dropped], *spec[dropped + 1:]))
    return replicated


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Batches are split along their first axis over the data-parallel axes."""
    return NamedSharding(mesh, PartitionSpec(("data", "fsdp")))


def data_parallel_size(mesh: Mesh) -> int:
    """How many ways a batch is split: the data x fsdp mesh axes."""
    return mesh.shape["data"] * mesh.shape["fsdp"]


def check_batch_size(batch_size: int, mesh: Mesh) -> None:
    """The global batch must split evenly over the data-parallel axes (data x fsdp)."""
    ways = data_parallel_size(mesh)
    if batch_size % ways:
        raise UserError(f"batch_size={batch_size} is not divisible by the data-parallel mesh axes data x fsdp = "
                        f"{mesh.shape['data']} x {mesh.shape['fsdp']} = {ways}. Change BATCH_SIZE or make_mesh.")


def shard_batch(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """A host's slice of the global batch -> global jax Arrays sharded over the data axes."""
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}


def global_batch(batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """A batch that every process holds whole -> global Arrays split over the data axes.

    For evaluation and inference, where every host reads the same examples: each process places
    only the rows of its own devices (no communication), unlike shard_batch, whose hosts each hold
    a slice (training).
    """
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_callback(v.shape, sharding, lambda index, v=v: v[index]) for k, v in batch.items()}


def replicated(x: np.ndarray, mesh: Mesh) -> jax.Array:
    """A value that every process holds (e.g. a PRNG key) -> a global Array on every device of `mesh`."""
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, NamedSharding(mesh, PartitionSpec()), lambda index: x[index])


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
            "name": _path_name(path),
            "shape": tuple(value.shape),
            "logical_axes": tuple(names),
            "mesh_axes": tuple(sharding.spec),
            "bytes_per_device": int(np.prod(shard_shape)) * np.dtype(value.dtype).itemsize,
        })
    return rows

"""Device mesh and logical-axis sharding rules.

Parameters and activations are annotated with *logical* axis names; `LOGICAL_RULES` (the one
table) maps each to mesh axes. Parameters carry their names as `nnx.Param(..., logical_axes=...)`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import numpy as np
from flax import nnx
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from hylo_jax.config import MeshConfig
from hylo_jax.errors import MeshError

MESH_AXES = ("data", "fsdp", "tensor", "sequence")

# logical axis -> mesh axes. Parameter axes first, then activation axes (prefixed "act_").
LOGICAL_RULES: dict[str, tuple[str, ...]] = {
    # parameters
    "vocab": ("tensor",),
    "embed": ("fsdp", "sequence"),  # ZeRO-3 over the sequence axis too (MaxText's rule)
    "mlp": ("tensor",),
    "q_heads": ("tensor",),  # flattened heads * head_dim of a projection
    "kv_heads": ("tensor",),
    "head_dim": (),
    "latent": (),  # MLA's low-rank latent (small: replicated)
    "norm": (),
    # activations
    "act_batch": ("data", "fsdp"),
    "act_length": ("sequence",),
    "act_embed": (),
    "act_heads": ("tensor",),
    "act_kv_heads": ("tensor",),
    "act_mlp": ("tensor",),
    "act_vocab": ("tensor",),
    "act_head_dim": (),
}

# Recurrent decode caches: conv windows [b, kernel - 1, channels (heads x dim)], states [b, heads, ., .].
CONV_CACHE_AXES = ("act_batch", None, "act_heads")
STATE_CACHE_AXES = ("act_batch", "act_heads", None, None)


def logical_to_spec(axes: Sequence[str | None]) -> PartitionSpec:
    """The PartitionSpec for a tuple of logical axis names (None = replicated)."""
    out = []
    for name in axes:
        if name is None:
            out.append(None)
            continue
        if name not in LOGICAL_RULES:
            raise KeyError(f"logical axis {name!r} has no rule in LOGICAL_RULES")
        mesh_axes = LOGICAL_RULES[name]
        out.append(None if not mesh_axes else mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes)
    return PartitionSpec(*out)


def resolve_mesh_shape(cfg: MeshConfig, num_devices: int) -> dict[str, int]:
    """Mesh axis sizes with a -1 filled in; `MeshError` if they cannot cover `num_devices`."""
    sizes = {a: getattr(cfg, a) for a in MESH_AXES}
    fill = [a for a, s in sizes.items() if s == -1]
    bad = [a for a, s in sizes.items() if s == 0 or s < -1]
    if bad or len(fill) > 1:
        raise MeshError(f"mesh sizes must be positive with at most one -1, got {sizes}")
    fixed = math.prod(s for s in sizes.values() if s != -1)
    if fill:
        if num_devices % fixed:
            raise MeshError(f"mesh {sizes}: fixed axes multiply to {fixed}, which does not divide "
                            f"the {num_devices} devices")
        sizes[fill[0]] = num_devices // fixed
    if math.prod(sizes.values()) != num_devices:
        raise MeshError(f"mesh {sizes} multiplies to {math.prod(sizes.values())} but "
                        f"{num_devices} devices are present")
    return sizes


def make_mesh(cfg: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A `Mesh` with axes (data, fsdp, tensor, sequence) over `devices` (default: all)."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = resolve_mesh_shape(cfg, len(devices))
    shape = tuple(sizes[a] for a in MESH_AXES)
    try:
        grid = mesh_utils.create_device_mesh(shape, devices)
    except (AssertionError, NotImplementedError, ValueError):
        grid = np.asarray(devices).reshape(shape)
    return Mesh(grid, MESH_AXES)


def _mesh_axis_size(mesh: Mesh, spec_entry) -> int:
    if spec_entry is None:
        return 1
    names = (spec_entry,) if isinstance(spec_entry, str) else spec_entry
    return math.prod(mesh.shape[n] for n in names)


def state_shardings(state: nnx.State, mesh: Mesh) -> nnx.State:
    """NamedShardings of every variable in `state` (abstract or concrete).

    Raises `MeshError` naming the parameter when a mesh axis does not divide the dimension it
    shards, so a bad mesh fails before any compilation.
    """

    def one(path, var):
        value = var.get_value() if hasattr(var, "get_value") else var.value
        names = var.get_metadata().get("logical_axes") or (None,) * len(value.shape)
        if len(names) != len(value.shape):
            raise ValueError(f"{path_str(path)}: logical axes {names} for shape {value.shape}")
        spec = logical_to_spec(names)
        for dim, entry, name in zip(value.shape, spec, names):
            size = _mesh_axis_size(mesh, entry)
            if dim % size:
                raise MeshError(f"parameter {path_str(path)} has {name} dimension {dim}, which "
                                f"mesh axes {entry} of size {size} do not divide")
        return NamedSharding(mesh, spec)

    return jax.tree.map_with_path(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def path_keys(path) -> list:
    """The plain keys of a pytree / nnx state path (dict keys, list indices, attribute names)."""
    return [getattr(p, "key", getattr(p, "idx", getattr(p, "name", p))) for p in path]


def path_str(path) -> str:
    """A parameter path as dotted text, e.g. 'model.layers.3.self_attn.q_proj.kernel'."""
    return ".".join(str(k) for k in path_keys(path))


def batch_axes(mesh, batch: int):
    """PartitionSpec entry of the batch-splitting mesh axes ("data", "fsdp") of size > 1; None if there are
    none or they do not divide `batch`."""
    axes = tuple(a for a in ("data", "fsdp") if a in mesh.axis_names and mesh.shape[a] > 1)
    if not axes or batch % math.prod(mesh.shape[a] for a in axes):
        return None
    return axes[0] if len(axes) == 1 else axes


def heads_axis(mesh, *counts: int):
    """"tensor" when the mesh splits heads (size > 1) and it divides every count; else None."""
    if "tensor" not in mesh.axis_names or mesh.shape["tensor"] == 1:
        return None
    return "tensor" if all(c % mesh.shape["tensor"] == 0 for c in counts) else None


def check_divides(mesh: Mesh, what: str, dim: int, axes: Sequence[str]) -> None:
    """`MeshError` unless the product of `axes` divides `dim` (e.g. batch over data*fsdp)."""
    size = math.prod(mesh.shape[a] for a in axes)
    if dim % size:
        raise MeshError(f"{what}={dim} is not divisible by mesh axes {tuple(axes)} of size {size}")


def reshard(x: jax.Array, sharding: jax.sharding.Sharding) -> jax.Array:
    """x on `sharding`. `jax.device_put` cannot move an array that spans other processes (multi-host),
    so such arrays go through a jitted identity with `out_shardings` (every process runs it)."""
    if getattr(x, "sharding", None) == sharding:
        return x
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return jax.jit(lambda a: a, out_shardings=sharding)(x)
    return jax.device_put(x, sharding)


def reshard_state(state: nnx.State, mesh: Mesh) -> nnx.State:
    """`state` (in place) with every variable on its `state_shardings` sharding (multi-host safe)."""
    pure = jax.tree.map(reshard, nnx.to_pure_dict(state), nnx.to_pure_dict(state_shardings(state, mesh)))
    nnx.replace_by_pure_dict(state, pure)
    return state


def place(model: nnx.Module, mesh: Mesh) -> nnx.Module:
    """`model` (in place) with every parameter moved onto its sharding on `mesh`."""
    nnx.update(model, reshard_state(nnx.state(model), mesh))
    return model


def constrain(x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
    """`with_sharding_constraint` by logical axes, when a mesh is set (`jax.set_mesh`); else x."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(x, logical_to_spec(logical_axes))


def constrain_dividing(x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
    """`constrain`, leaving replicated each dimension that its mesh axes do not divide (a cache of one row
    on a data-parallel mesh, 8 KV heads over 16 tensor shards): for decode caches, whose shapes follow
    the request."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    spec = [entry if dim % _mesh_axis_size(mesh, entry) == 0 else None
            for dim, entry in zip(x.shape, logical_to_spec(logical_axes))]
    return jax.lax.with_sharding_constraint(x, PartitionSpec(*spec))

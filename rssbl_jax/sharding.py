"""Partition specs for adapter params that follow their base kernel; batch specs; placing trees on a mesh.

Each adapter's factors follow the base kernel's spec, so no factor is gathered more than the kernel itself: for a
Dense ``kernel (d_in, d_out)`` with ``P(i, o)``, ``lora_a (d_in, r)`` gets ``P(i, None)``, ``lora_b (r, d_out)``
``P(None, o)``, ``bias`` ``P(o)`` unless given; ``lora_c`` and ``lora_s (d_p, r)`` are replicated, ``P()``; more axes
(``DenseGeneral``, ``Conv``): :func:`rssbl_jax.tree.axes_from_kernel`. Per-example inputs, targets and
``p [batch, d_p]`` are sharded along the batch (``P(data_axis)``), a shared ``p [d_p]`` replicated; the results are
plain ``PartitionSpec`` trees.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from rssbl_jax import patterns
from rssbl_jax.tree import BASE_WEIGHT_NAMES, PyTree, adapter_leaf_paths, axes_from_kernel, is_adapter_leaf_name

_path_str = patterns.path_str
SpecRules = Sequence[tuple[str, PartitionSpec]]


def _is_spec(x: Any) -> bool:
    return isinstance(x, PartitionSpec)


def _padded(spec: PartitionSpec, ndim: int, path: str) -> tuple[Any, ...]:
    entries = tuple(spec)
    if len(entries) > ndim:
        raise ValueError(f"partition spec {spec} for '{path}' has {len(entries)} entries but the leaf has {ndim} axes.")
    return entries + (None,) * (ndim - len(entries))


def _base_lookup(base_specs: PyTree | SpecRules):
    """``path -> PartitionSpec | None`` for base (non-adapter) leaves."""
    if isinstance(base_specs, (list, tuple)) and len(base_specs) > 0:
        if all(isinstance(r, tuple) and len(r) == 2 and isinstance(r[0], str) and _is_spec(r[1]) for r in base_specs):
            rules = patterns.as_pairs(base_specs, "base_specs")
            return lambda path: patterns.first_match(rules, path, None)
    flat = jax.tree_util.tree_flatten_with_path(base_specs, is_leaf=_is_spec)[0]
    table = {_path_str(path): spec for path, spec in flat}
    bad = [path for path, spec in table.items() if not _is_spec(spec)]
    if bad:
        raise TypeError(f"base_specs must hold PartitionSpec leaves; '{bad[0]}' holds {type(table[bad[0]]).__name__}.")
    return table.get


def adapter_partition_specs(params: PyTree, base_specs: PyTree | SpecRules, *, mesh: Mesh | None = None) -> PyTree:
    """Partition specs for a whole adapted params tree, adapter factors following their layer's kernel.

    Args:
      params: arrays or ``jax.ShapeDtypeStruct`` (e.g. ``variables["params"]``).
      base_specs: a ``PartitionSpec`` tree at the base leaves' paths (``lora_*`` and extra entries ignored), or
        ``(regex, spec)`` rules, the first ``re.fullmatch`` of the path winning (``".*/mlp/kernel"``).
      mesh: when given, every spec is checked against it with :func:`validate_specs`.

    Returns:
      ``params``' structure with a ``PartitionSpec`` at every leaf (the rule of the module docstring).

    Raises:
      ValueError: naming the path: a base leaf other than a ``bias`` has no spec, a spec has more entries than its
        leaf has axes, an adapter has no ``kernel`` beside it, or (with ``mesh``) a spec does not fit.

    >>> import jax, jax.numpy as jnp, rssbl_jax
    >>> layer = rssbl_jax.RSSBilinearLoRADense(features=16, rank=4, lora_alpha=8.0)
    >>> params = jax.eval_shape(layer.init, jax.random.key(0), jnp.ones((2, 8)), jnp.ones((2, 3)))["params"]
    >>> specs = adapter_partition_specs(params, [("kernel", jax.P(None, "model"))])
    >>> specs["lora_a"], specs["lora_b"], specs["lora_c"], specs["bias"]
    (P(None, None), P(None, 'model'), P(), P('model',))
    """
    lookup = _base_lookup(base_specs)
    flat, treedef = jax.tree_util.tree_flatten_with_path(params)
    given: dict[str, tuple[Any, Any, PartitionSpec]] = {}
    adapter_paths = adapter_leaf_paths(params)
    for path, leaf in flat:
        name = _path_str(path)
        if name in adapter_paths:
            continue
        spec = lookup(name)
        if spec is None and getattr(path[-1], "key", None) == "bias":
            continue  # derived from the kernel below
        if spec is None:
            raise ValueError(f"no partition spec for base parameter '{name}' of shape {tuple(leaf.shape)}.")
        _padded(spec, len(leaf.shape), name)  # raises for a spec with more entries than the leaf has axes
        given[name] = (path, leaf, spec)

    def kernel_of(path: Sequence[Any], what: str) -> tuple[tuple[Any, ...], tuple[int, ...]]:
        candidates = (_path_str((*path[:-1], jax.tree_util.DictKey(weight))) for weight in BASE_WEIGHT_NAMES)
        kernel = next((candidate for candidate in candidates if candidate in given), None)
        if kernel is None:
            raise ValueError(f"'{_path_str(path)}' ({what}) has no 'kernel' beside it to take its partition spec from.")
        return tuple(given[kernel][2]), tuple(given[kernel][1].shape)  # axes_from_kernel pads the spec to the kernel

    def spec_for(path: Sequence[Any], leaf: Any) -> PartitionSpec:
        name, key = _path_str(path), getattr(path[-1], "key", None)
        if name in given:
            return given[name][2]
        if is_adapter_leaf_name(key) and key not in ("lora_a", "lora_b"):
            return PartitionSpec()
        if key in ("lora_a", "lora_b", "bias"):  # A keeps the kernel's input axes, B (and a bias) its output axes
            kspec, kshape = kernel_of(path, key)
            return PartitionSpec(*axes_from_kernel(key, tuple(leaf.shape), kspec, kshape))
        raise ValueError(f"no partition spec for '{name}'.")

    specs = jax.tree.unflatten(treedef, [spec_for(path, leaf) for path, leaf in flat])
    if mesh is not None:
        for path, leaf, spec in given.values():  # the user's specs first, then the derived ones
            _check_one(path, leaf, spec, mesh)
        validate_specs(params, specs, mesh)
    return specs


def validate_specs(tree: PyTree, specs: PyTree, mesh: Mesh) -> None:
    """Check that every spec names axes of ``mesh`` whose sizes divide the leaf's dimensions.

    Args:
      tree: arrays or ``jax.ShapeDtypeStruct``.
      specs: a ``PartitionSpec`` tree with ``tree``'s structure (or a prefix of it).
      mesh: the mesh the specs are meant for.

    Raises:
      ValueError: for the first spec that does not fit, naming the path, shape, spec and mesh axis sizes.

    >>> validate_specs({"x": jax.numpy.ones((4, 6))}, {"x": jax.P(None, "model")}, jax.make_mesh((1,), ("model",)))
    """
    flat_specs, spec_tree = jax.tree_util.tree_flatten_with_path(specs, is_leaf=_is_spec)
    subtrees = jax.tree.structure(specs, is_leaf=_is_spec).flatten_up_to(tree)
    for (prefix, spec), subtree in zip(flat_specs, subtrees, strict=True):
        for path, leaf in jax.tree_util.tree_flatten_with_path(subtree)[0]:
            _check_one((*prefix, *path), leaf, spec, mesh)


def _check_one(path: Sequence[Any], leaf: Any, spec: PartitionSpec | None, mesh: Mesh) -> None:
    if spec is None:
        return
    shape = tuple(getattr(leaf, "shape", ()))
    name = _path_str(path) or "(root)"
    for axis, entry in enumerate(_padded(spec, len(shape), name)):
        if entry is None:
            continue
        names = entry if isinstance(entry, tuple) else (entry,)
        unknown = [n for n in names if n not in mesh.shape]
        if unknown:
            raise ValueError(
                f"partition spec {spec} for '{name}' of shape {shape} names mesh axis {unknown[0]!r}, not in the mesh "
                f"axes {dict(mesh.shape)}."
            )
        size = math.prod(mesh.shape[n] for n in names)
        if shape[axis] % size:
            raise ValueError(
                f"partition spec {spec} does not fit '{name}' of shape {shape}: axis {axis} has size {shape[axis]}, "
                f"not divisible by the {size} devices of mesh axes {names} (mesh {dict(mesh.shape)})."
            )


def batch_spec(data_axis: str | tuple[str, ...] = "data") -> PartitionSpec:
    """The spec of a per-example array (inputs, targets, per-example ``p``): leading axis over ``data_axis``.

    >>> batch_spec("data")
    P('data',)
    """
    return PartitionSpec(data_axis)


def operating_params_spec(operating_params: Any, data_axis: str | tuple[str, ...] = "data") -> PartitionSpec:
    """The spec of the operating parameters: sharded with the batch when per-example, replicated when shared.

    Args:
      operating_params: ``p`` (anything with ``.shape``): ``[d_p]`` or ``[batch, ..., d_p]``.
      data_axis: the mesh axis (or axes) the batch is sharded over.

    >>> operating_params_spec(jax.numpy.ones((32, 3))), operating_params_spec(jax.numpy.ones(3))
    (P('data',), P())
    """
    return PartitionSpec() if len(operating_params.shape) <= 1 else PartitionSpec(data_axis)


def named_shardings(mesh: Mesh, specs: PyTree) -> PyTree:
    """A tree of ``NamedSharding(mesh, spec)`` for a tree of specs (``None`` entries stay ``None``).

    >>> shardings = named_shardings(jax.make_mesh((1,), ("data",)), {"x": jax.P("data"), "y": None})
    >>> shardings["x"].spec, shardings["y"]
    (P('data',), None)
    """
    return jax.tree.map(lambda spec: NamedSharding(mesh, spec), specs, is_leaf=_is_spec)


def shard_params(params: PyTree, mesh: Mesh, specs: PyTree) -> PyTree:
    """Place a params tree on ``mesh`` (``jax.device_put`` with ``NamedSharding``), after checking the specs fit.

    Every process must pass the same values (as with parameters from one random key or one checkpoint).

    Args:
      params: arrays.
      mesh: the device mesh.
      specs: a ``PartitionSpec`` tree with ``params``' structure, e.g. from :func:`adapter_partition_specs`.

    >>> shard_params({"x": jax.numpy.ones(6)}, jax.make_mesh((1,), ("m",)), {"x": jax.P("m")})["x"].sharding.spec
    P('m',)
    """
    validate_specs(params, specs, mesh)
    return jax.device_put(params, named_shardings(mesh, specs))


def shard_batch(batch: PyTree, mesh: Mesh, specs: PyTree | PartitionSpec | None = None) -> PyTree:
    """Global arrays from each process's part of a batch (``jax.make_array_from_process_local_data``).

    Args:
      batch: a tree of host arrays, this process's rows (in a single process, the whole batch).
      mesh: the (global) device mesh.
      specs: a ``PartitionSpec`` or a tree prefix of ``batch`` of them; ``None`` shards every leaf's leading axis
        over the mesh's first axis. Use :func:`operating_params_spec` for ``p``.

    >>> import numpy as np
    >>> shard_batch({"x": np.ones((4, 2))}, jax.make_mesh((1,), ("data",)))["x"].sharding.spec
    P('data',)
    """
    shardings = named_shardings(mesh, batch_spec(mesh.axis_names[0]) if specs is None else specs)
    return jax.tree.map(
        lambda sharding, leaf: jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), leaf),
        shardings,
        batch,
        is_leaf=lambda x: isinstance(x, NamedSharding),
    )


def local_batch_slice(mesh: Mesh, global_batch_size: int, data_axis: str | tuple[str, ...] = "data") -> slice:
    """The rows of a global batch that this process feeds to :func:`shard_batch` (its devices' rows).

    Args:
      mesh: the global mesh.
      global_batch_size: rows of the global batch.
      data_axis: the mesh axis (or axes) the batch is sharded over.

    Raises:
      ValueError: when this process's devices do not hold one contiguous range of rows.

    >>> local_batch_slice(jax.make_mesh((1,), ("data",)), 16)
    slice(0, 16, None)
    """
    index = NamedSharding(mesh, batch_spec(data_axis)).addressable_devices_indices_map((global_batch_size,))
    ranges = [idx[0].indices(global_batch_size)[:2] for idx in index.values()]
    start, stop = min(r[0] for r in ranges), max(r[1] for r in ranges)
    covered = {row for r in ranges for row in range(*r)}
    if covered != set(range(start, stop)):
        raise ValueError(
            f"this process's devices hold rows {sorted(covered)} of the batch, not a contiguous range; "
            "order the mesh's devices by process (jax.make_mesh does)."
        )
    return slice(start, stop)

r"""CoLoRA's HDF5 trajectory format: one file per physics parameter ``μ``, read from a directory the user names.

Each file holds a dataset ``u`` of shape ``(q, t, x0[, x1])`` (quantities, time, one or two space axes) whose
dimension scales are datasets of the same names (``t``, ``x0``, ``x1``), and an attribute ``mu`` (a scalar or a
vector). :func:`load_dir` stacks every ``*.hdf5`` of a directory, sorted by ``μ``; :func:`snapshots` turns the
trajectories of some ``μ`` into the rows the model trains on:

.. math::

    y \in \mathbb{R}^{(M T) \times N \times Q}, \qquad (\mu, t) \in \mathbb{R}^{(M T) \times (d_\mu + 1)}, \qquad
    X \in \mathbb{R}^{N \times d_x}

with ``N`` the grid points (``x0`` major, ``indexing="ij"``), as CoLoRA's ``prepare_coordinate_data`` lays them out.

>>> import tempfile, numpy as np
>>> directory = tempfile.mkdtemp()
>>> for mu in (0.1, 0.2):
...     write_file(f"{directory}/f{mu}.hdf5", np.full((1, 3, 4), mu, np.float32), mu, np.arange(3.0), [np.arange(4.0)])
>>> data = load_dir(directory)
>>> data.u.shape, data.mus[:, 0].tolist()
((2, 1, 3, 4), [0.1, 0.2])
>>> y, mu_t = snapshots(data, [0.2])
>>> y.shape, mu_t.shape, grid(data).shape
((3, 4, 1), (3, 2), (4, 1))
"""

from __future__ import annotations

import hashlib
import pathlib
from collections.abc import Sequence
from typing import NamedTuple

import h5py
import numpy as np


class Trajectories(NamedTuple):
    """Every trajectory of one directory, sorted by ``μ``.

    Attributes:
      mus: ``[M, d_mu]`` physics parameters.
      u: ``[M, Q, T, *space]`` solution fields (float32).
      t: ``[T]`` times.
      axes: one ``[n_i]`` coordinate array per space axis.
      files: file names, in the order of ``mus``.
      sha256: ``{file name: SHA-256 hex digest}``.
    """

    mus: np.ndarray
    u: np.ndarray
    t: np.ndarray
    axes: tuple[np.ndarray, ...]
    files: tuple[str, ...]
    sha256: dict[str, str]

    @property
    def period(self) -> tuple[float, ...]:
        """Length of each space axis, ``x[-1] - x[0]``: the period CoLoRA gives its periodic first layer."""
        return tuple(float(a[-1] - a[0]) for a in self.axes)


def write_file(path: str | pathlib.Path, u: np.ndarray, mu: float | Sequence[float], t: np.ndarray,
               axes: Sequence[np.ndarray]) -> None:  # fmt: skip
    """Write one trajectory ``u [Q, T, *space]`` in CoLoRA's format (dimension scales ``q, t, x0[, x1]``)."""
    u = np.asarray(u, np.float32)
    if u.ndim != 2 + len(axes) or u.shape[1] != len(t) or tuple(u.shape[2:]) != tuple(len(a) for a in axes):
        raise ValueError(f"u {u.shape} does not fit t ({len(t)},) and axes {[len(a) for a in axes]}.")
    names = ("q", "t", *(f"x{i}" for i in range(len(axes))))
    with h5py.File(path, "w") as f:
        f.attrs["mu"] = np.asarray(mu, np.float64)
        dataset = f.create_dataset("u", data=u)
        for i, (name, values) in enumerate(zip(names, (np.arange(u.shape[0]), t, *axes), strict=True)):
            f.create_dataset(name, data=np.asarray(values))
            f[name].make_scale(name)
            dataset.dims[i].attach_scale(f[name])
            dataset.dims[i].label = name


def _read(path: pathlib.Path) -> tuple[np.ndarray, list[np.ndarray], np.ndarray]:
    with h5py.File(path, "r") as f:
        if "u" not in f:
            raise ValueError(f"{path}: no dataset 'u' (CoLoRA's format has u of shape (q, t, x0[, x1])).")
        if "mu" not in f.attrs:
            raise ValueError(f"{path}: no attribute 'mu'.")
        u = f["u"][()]
        if u.ndim not in (3, 4):
            raise ValueError(f"{path}: u has shape {u.shape}; expected (q, t, x0) or (q, t, x0, x1).")
        scales = [f[dim.label][()] for dim in f["u"].dims]
        return u, scales, np.asarray(f.attrs["mu"], np.float64).reshape(-1)


def load_dir(directory: str | pathlib.Path) -> Trajectories:
    """Every ``*.hdf5`` file of ``directory``, stacked and sorted by ``μ`` (lexicographically for vector ``μ``).

    Raises:
      FileNotFoundError: when the directory has no ``.hdf5`` file (naming it).
      ValueError: when the files disagree on shapes or coordinates.
    """
    directory = pathlib.Path(directory)
    paths = sorted(directory.glob("*.hdf5"))
    if not paths:
        raise FileNotFoundError(
            f"no *.hdf5 files in {directory} (set config.data_dir or $COLORA_DATA_DIR to the directory that holds "
            "CoLoRA's data/, e.g. a copy of github.com/julesberman/CoLoRA/data)."
        )
    fields, scales, mus, digests = [], None, [], {}
    for path in paths:
        u, s, mu = _read(path)
        if scales is None:
            scales = s
        elif u.shape != fields[0].shape or not all(map(np.array_equal, s[1:], scales[1:])):
            raise ValueError(f"{path}: u {u.shape} or its coordinates differ from {paths[0]}'s ({fields[0].shape}).")
        fields.append(u)
        mus.append(mu)
        digests[path.name] = hashlib.sha256(path.read_bytes()).hexdigest()
    mus_arr = np.stack(mus)
    order = np.lexsort(mus_arr.T[::-1])
    return Trajectories(
        mus=mus_arr[order],
        u=np.stack(fields)[order].astype(np.float32),
        t=np.asarray(scales[1], np.float64),
        axes=tuple(np.asarray(a, np.float64) for a in scales[2:]),
        files=tuple(paths[i].name for i in order),
        sha256=digests,
    )


def indices(data: Trajectories, mus: Sequence[float] | np.ndarray) -> np.ndarray:
    """Indices of the trajectories whose ``μ`` is in ``mus`` (to relative 1e-6), in the order of ``mus``."""
    wanted = np.asarray(mus, np.float64).reshape(len(mus), -1)
    out = []
    for mu in wanted:
        hit = np.flatnonzero(np.all(np.isclose(data.mus, mu[None], rtol=1e-6, atol=0.0), axis=1))
        if hit.size != 1:
            raise ValueError(f"mu={mu.tolist()} matches {hit.size} trajectories; have mus {data.mus.tolist()}.")
        out.append(int(hit[0]))
    return np.asarray(out)


def grid(data: Trajectories) -> np.ndarray:
    """The space points ``X [N, d_x]`` (``indexing="ij"``: the first axis varies slowest), float32."""
    mesh = np.meshgrid(*data.axes, indexing="ij")
    return np.stack([m.reshape(-1) for m in mesh], axis=1).astype(np.float32)


def snapshots(data: Trajectories, mus: Sequence[float] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows ``y [(M T), N, Q]`` and their ``(μ, t) [(M T), d_mu + 1]`` for the trajectories at ``mus`` (μ major)."""
    idx = indices(data, mus)
    u = data.u[idx]  # [M, Q, T, *space]
    m, q, t = u.shape[:3]
    y = np.moveaxis(u.reshape(m, q, t, -1), 1, -1).reshape(m * t, -1, q)
    mu_t = np.concatenate([np.repeat(data.mus[idx], t, axis=0), np.tile(data.t[:, None], (m, 1))], axis=1)
    return y, mu_t.astype(np.float32)

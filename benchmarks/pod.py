"""A pod-shaped model: an 8-block transformer at width 1024, FSDP × tensor-parallel over 8 devices, RSS adapters.

    python -m benchmarks.pod                 # 8 forced host devices; writes the "Pod-shaped model" section
    python -m benchmarks.pod --small         # a tiny transformer (what tests/test_pod.py runs), prints only
    python -m benchmarks.pod --worker ...    # one process of the 2-process (gloo over loopback) run; internal

The base is random (``jax.eval_shape`` gives every figure that needs no values). Kernels carry logical axis names
(``nn.with_logical_partitioning``); :data:`RULES` map them onto a ``(fsdp, tensor)`` mesh; :func:`rssbl_jax.inject`
gives every adapter its base kernel's names (``A`` keeps the input axis, ``B`` the output axis). The measured
figures: per-device bytes of params and Adam state against one eighth of the total (exact, from the shardings);
one adapter training step on the mesh against the same step on one device (numerically); the same step as 2
processes × 4 devices over gloo.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
import zlib

if __name__ == "__main__" and "--worker" not in sys.argv:  # before jax initialises its backend
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import linen as nn  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import rssbl_jax  # noqa: E402

RULES = (("batch", "fsdp"), ("embed", "fsdp"), ("heads", "tensor"), ("mlp", "tensor"), ("vocab", "tensor"))
"""Logical axis → mesh axis: FSDP shards the model dimension of every kernel, tensor parallelism the heads/MLP."""

TARGETS = r"block_\d+/(attention/(query|key|value|out)|mlp/(up|down))"


@dataclasses.dataclass(frozen=True)
class Shape:
    width: int = 1024
    depth: int = 8
    heads: int = 8
    mlp: int = 4096
    vocab: int = 2048
    batch: int = 8
    seq: int = 32
    rank: int = 16
    d_p: int = 4
    fsdp: int = 4
    tensor: int = 2
    base: str = "float32"  # or a rssbl_jax.quantize format: "int8", "nf4", ...


SMALL = Shape(width=64, depth=2, heads=4, mlp=128, vocab=96, batch=8, seq=8, rank=4, d_p=3)


def _dense(features, names, name):
    return nn.Dense(features, kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), names),
                    bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), names[-1:]), name=name)  # fmt: skip  # noqa: E501


class Attention(nn.Module):
    shape: Shape

    @nn.compact
    def __call__(self, x):
        s = self.shape
        q, k, v = (_dense(s.width, ("embed", "heads"), n)(x) for n in ("query", "key", "value"))
        split = lambda t: t.reshape(*t.shape[:-1], s.heads, s.width // s.heads)  # noqa: E731
        logits = jnp.einsum("bqhd,bkhd->bhqk", split(q), split(k)) / math.sqrt(s.width // s.heads)
        mask = jnp.tril(jnp.ones((x.shape[1], x.shape[1]), bool))
        logits = jnp.where(mask[None, None], logits, jnp.finfo(logits.dtype).min)
        out = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(logits, -1), split(v)).reshape(x.shape)
        return _dense(s.width, ("heads", "embed"), "out")(out)


class Mlp(nn.Module):
    shape: Shape

    @nn.compact
    def __call__(self, x):
        h = nn.gelu(_dense(self.shape.mlp, ("embed", "mlp"), "up")(x))
        return _dense(self.shape.width, ("mlp", "embed"), "down")(h)


class Block(nn.Module):
    shape: Shape

    @nn.compact
    def __call__(self, x):
        norm = lambda name: nn.LayerNorm(name=name, scale_init=nn.with_logical_partitioning(  # noqa: E731
            nn.initializers.ones_init(), ("embed",)), bias_init=nn.with_logical_partitioning(
            nn.initializers.zeros_init(), ("embed",)))  # fmt: skip
        x = x + Attention(self.shape, name="attention")(norm("norm_1")(x))
        return x + Mlp(self.shape, name="mlp")(norm("norm_2")(x))


class Transformer(nn.Module):
    """A decoder-only transformer whose every weight carries logical axis names."""

    shape: Shape

    @nn.compact
    def __call__(self, tokens):
        s = self.shape
        embed = nn.Embed(s.vocab, s.width, name="embed", embedding_init=nn.with_logical_partitioning(
            nn.initializers.normal(1.0), ("vocab", "embed")))  # fmt: skip
        x = embed(tokens)
        for i in range(s.depth):
            x = Block(s, name=f"block_{i}")(x)
        return _dense(s.vocab, ("embed", "vocab"), "head")(nn.LayerNorm(name="norm_out", use_bias=False)(x))


def config(s: Shape) -> rssbl_jax.AdapterConfig:
    return rssbl_jax.AdapterConfig(rank=s.rank, lora_alpha=2.0 * s.rank, targets=TARGETS, gate_offset=1.0)


def model(s: Shape):
    if s.base == "float32":
        return rssbl_jax.inject(Transformer(s), config(s))
    from rssbl_jax import quantize

    return rssbl_jax.inject(quantize.quantize_base(Transformer(s), s.base), config(s))


def batch(s: Shape, seed: int = 0):
    k = jax.random.key(1000 + seed)
    tokens = jax.random.randint(k, (s.batch, s.seq + 1), 0, s.vocab)
    p = jax.random.normal(jax.random.fold_in(k, 1), (s.batch, s.d_p))
    return {"tokens": tokens[:, :-1], "targets": tokens[:, 1:], "p": p}


def abstract_variables(s: Shape):
    b = batch(s)
    return jax.eval_shape(lambda: model(s).init(jax.random.key(0), b["tokens"], p=b["p"]))


def init_params(s: Shape, seed: int = 0):
    """Unboxed params with every adapter factor nonzero (B = 0 at init would leave A's and C's gradients at 0)."""
    b = batch(s)
    params = nn.meta.unbox(model(s).init(jax.random.key(seed), b["tokens"], p=b["p"]))["params"]

    def perturb(path, leaf):
        name = str(path[-1].key)
        if name in ("lora_b", "lora_s"):
            return 0.02 * jax.random.normal(jax.random.fold_in(
                jax.random.key(seed + 1), zlib.crc32(jax.tree_util.keystr(path).encode())
                                                                % 2**31), leaf.shape)  # fmt: skip
        return leaf

    return jax.tree_util.tree_map_with_path(perturb, params)


def loss_fn(s: Shape):
    adapted = model(s)

    def loss(params, b, rng):
        del rng
        logits = adapted.apply({"params": params}, b["tokens"], p=b["p"])
        return optax.softmax_cross_entropy_with_integer_labels(logits, b["targets"]).mean()

    return loss


def param_specs(s: Shape, mesh) -> dict:
    """PartitionSpecs of the params from their logical names (adapters included: inherited at injection)."""
    logical = nn.get_partition_spec(abstract_variables(s))["params"]
    return nn.logical_to_mesh(logical, RULES)


def make_mesh(s: Shape, devices=None):
    devices = np.asarray(devices if devices is not None else jax.devices()).reshape(s.fsdp, s.tensor)
    return jax.sharding.Mesh(devices, ("fsdp", "tensor"))


def sharded_step(s: Shape, tx, mesh):
    """(state shardings, jitted step, batch shardings) on the mesh."""
    specs = param_specs(s, mesh)
    abstract = nn.meta.unbox(abstract_variables(s))["params"]
    state = jax.eval_shape(lambda: rssbl_jax.init_train_state(abstract, tx, jax.random.key(0), config=config(s)))
    state_specs = rssbl_jax.state_partition_specs(state, tx, specs)
    state_shardings = jax.tree.map(lambda spec: NamedSharding(mesh, spec), state_specs,
                                   is_leaf=lambda x: isinstance(x, P))  # fmt: skip
    batch_shardings = {"tokens": NamedSharding(mesh, P("fsdp")), "targets": NamedSharding(mesh, P("fsdp")),
                       "p": NamedSharding(mesh, P("fsdp"))}  # fmt: skip
    step = jax.jit(rssbl_jax.make_train_step(loss_fn(s), tx), in_shardings=(state_shardings, batch_shardings),
                   out_shardings=(state_shardings, None))  # fmt: skip
    return state, state_shardings, step, batch_shardings


def per_device_bytes(abstract_tree, shardings):
    """(total bytes, bytes on the fullest device) of a tree laid out by ``shardings``."""
    total, per_device = 0, 0
    for leaf, sharding in zip(jax.tree.leaves(abstract_tree), jax.tree.leaves(shardings), strict=True):
        dtype = jnp.dtype(leaf.dtype)
        bits = jnp.iinfo(dtype).bits if jnp.issubdtype(dtype, jnp.integer) else 8 * dtype.itemsize  # int4: 4
        total += math.prod(leaf.shape) * bits // 8
        per_device += math.prod(sharding.shard_shape(leaf.shape)) * bits // 8
    return total, per_device


def memory_table(s: Shape, mesh, *, compiled: bool = True):
    """Total and fullest-device bytes of base, adapters and Adam state; with ``compiled``, XLA's figures too."""
    tx = optax.adam(1e-3)
    state, shardings, step, batch_shardings = sharded_step(s, tx, mesh)
    rows = {}
    for name, sub, sub_sh in (("frozen base", state.frozen, shardings.frozen),
                              ("adapters", state.trainable, shardings.trainable),
                              ("Adam state (adapters)", state.opt_state, shardings.opt_state)):  # fmt: skip
        rows[name] = per_device_bytes(sub, sub_sh)
    if not compiled:
        return rows
    b = jax.eval_shape(lambda: batch(s))
    compiled = step.lower(state, b).compile()
    rows["compiled step: arguments (XLA, per device)"] = (None, compiled.memory_analysis().argument_size_in_bytes)
    rows["compiled step: temporaries (XLA, per device)"] = (None, compiled.memory_analysis().temp_size_in_bytes)
    single = jax.jit(rssbl_jax.make_train_step(loss_fn(s), tx)).lower(state, b).compile().memory_analysis()
    rows["compiled step: arguments (XLA, per device)"] = (
        single.argument_size_in_bytes,
        rows["compiled step: arguments (XLA, per device)"][1],
    )
    rows["compiled step: temporaries (XLA, per device)"] = (
        single.temp_size_in_bytes,
        rows["compiled step: temporaries (XLA, per device)"][1],
    )
    return rows


def one_step(s: Shape, mesh=None, seed: int = 0):
    """Loss and updated params after one SGD step, on one device (``mesh=None``) or laid out on ``mesh``."""
    tx = optax.sgd(0.5)
    params = init_params(s, seed)
    b = batch(s, seed)
    state = rssbl_jax.init_train_state(params, tx, jax.random.key(seed), config=config(s))
    if mesh is None:
        step = jax.jit(rssbl_jax.make_train_step(loss_fn(s), tx))
    else:
        _, shardings, step, batch_shardings = sharded_step(s, tx, mesh)
        state = jax.device_put(state, shardings)
        b = jax.device_put(b, batch_shardings)
    new, metrics = step(state, b)
    return float(metrics["loss"]), new, state


def flat_adapters(state, *, gather=False):
    from jax.experimental import multihost_utils

    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(state.trainable)[0]:
        if gather and not leaf.is_fully_addressable:
            leaf = multihost_utils.process_allgather(leaf, tiled=True)
        out[jax.tree_util.keystr(path)] = np.asarray(leaf)
    return out


def compare(a: dict, b: dict, a0: dict):
    """max |Δ| between two updated adapter trees, and relative to the largest update (new − old)."""
    diff = max(float(np.abs(a[k] - b[k]).max()) for k in a)
    update = max(float(np.abs(a[k] - a0[k]).max()) for k in a)
    return diff, diff / update


# ------------------------------------------------------------------------------------------------ 2 processes


def worker(argv):
    parser = argparse.ArgumentParser()
    parser.add_argument("--worker", action="store_true")
    parser.add_argument("--process-id", type=int, required=True)
    parser.add_argument("--coordinator", required=True)
    parser.add_argument("--small", action="store_true")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=args.coordinator, num_processes=2, process_id=args.process_id,
                               initialization_timeout=120)  # fmt: skip
    s = SMALL if args.small else Shape()
    mesh = make_mesh(s, jax.devices())
    t0 = time.perf_counter()
    loss, new, _ = one_step(s, mesh)
    flat = flat_adapters(new, gather=True)
    if jax.process_index() == 0:
        np.savez(args.out, **flat)
        with open(args.out + ".json", "w") as f:
            json.dump({"loss": loss, "processes": jax.process_count(), "devices": jax.device_count(),
                       "seconds": time.perf_counter() - t0}, f)  # fmt: skip


def run_two_processes(small: bool, out: str, timeout: float = 900) -> dict:
    """Launch 2 worker processes × 4 forced CPU devices over gloo on loopback; kill both on failure or timeout."""
    import signal
    import socket
    import subprocess

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    procs = []
    try:
        for i in range(2):
            cmd = [sys.executable, "-m", "benchmarks.pod", "--worker", "--process-id", str(i), "--coordinator",
                   f"127.0.0.1:{port}", "--out", out] + (["--small"] if small else [])  # fmt: skip
            procs.append(subprocess.Popen(cmd, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                          start_new_session=True))  # fmt: skip
        deadline = time.monotonic() + timeout
        for proc in procs:
            _, err = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
            if proc.returncode != 0:
                raise RuntimeError(f"worker exited with {proc.returncode}:\n{err.decode()[-3000:]}")
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    with open(out + ".json") as f:
        meta = json.load(f)
    with np.load(out) as data:
        meta["adapters"] = {k: data[k] for k in data.files}
    return meta


# ------------------------------------------------------------------------------------------------ report


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if "--worker" in argv:
        return worker(argv)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true")
    parser.add_argument("--no-processes", action="store_true", help="skip the 2-process run")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)
    s = SMALL if args.small else Shape()
    mesh = make_mesh(s)
    from benchmarks.report import Lines, load_average

    emit = Lines()

    n_params = sum(math.prod(x.shape) for x in jax.tree.leaves(abstract_variables(s)))
    emit("## Pod-shaped model: FSDP × tensor parallel over 8 devices (`benchmarks/pod.py`)")
    emit()
    emit(f"Command: `python -m benchmarks.pod{' --small' if args.small else ''}` (8 forced host CPU devices). "
         f"Date: {time.strftime('%Y-%m-%d')}.")  # fmt: skip
    emit()
    emit(f"A decoder-only transformer: {s.depth} blocks, width {s.width}, {s.heads} heads, MLP {s.mlp}, vocab {s.vocab}; "  # noqa: E501
         f"{n_params / 1e6:.1f} M parameters in all. RSS adapters (r = {s.rank}, d_p = {s.d_p}, per-example p) on "
         f"query, key, value, out, up and down of every block. Mesh ({s.fsdp} fsdp × {s.tensor} tensor); rules "
         f"`{RULES}`. Every kernel is 2-D sharded; `A` inherits the kernel's input axis, `B` its output axis, `C`/`S` "
         "are replicated.")  # fmt: skip
    emit()
    emit("### Per-device memory (exact: shard shapes of the shardings, and XLA's buffer assignment)")
    emit()
    rows = memory_table(s, mesh)
    emit("| tree | total MiB | fullest device MiB | total / 8 MiB | device / (total / 8) |")
    emit("|---|---:|---:|---:|---:|")
    for name, (total, device) in rows.items():
        if name.startswith("compiled"):
            continue
        emit(
            f"| {name} | {total / 2**20:.2f} | {device / 2**20:.3f} | {total / 8 / 2**20:.3f} | {device / (total / 8):.3f} |"  # noqa: E501
        )
    emit()
    emit("| compiled Adam step | one device MiB | per device on the mesh MiB | ratio |")
    emit("|---|---:|---:|---:|")
    for name, (single, device) in rows.items():
        if name.startswith("compiled"):
            emit(
                f"| {name.split(': ')[1].split(' (')[0]} | {single / 2**20:.1f} | {device / 2**20:.1f} | {device / single:.3f} |"  # noqa: E501
            )
    emit()
    emit("The same model on a qwix-quantised base (`Shape(base=...)`; exact, abstract): every Dense kernel quantised,")
    emit("the embedding and LayerNorms float32. The quantised kernels keep their partitioning and the adapters follow.")
    emit()
    emit("| base | frozen base total MiB | fullest device MiB | device / (total / 8) | total / float32 base total |")
    emit("|---|---:|---:|---:|---:|")
    float_total = rows["frozen base"][0]
    for base in ("float32", "int8", "nf4"):
        total, device = memory_table(dataclasses.replace(s, base=base), mesh, compiled=False)["frozen base"]
        emit(f"| {base} | {total / 2**20:.2f} | {device / 2**20:.3f} | {device / (total / 8):.3f} | "
             f"{total / float_total:.3f} |")  # fmt: skip
    emit()
    emit("### One adapter training step: mesh vs one device (SGD, lr 0.5, all adapter factors nonzero)")
    emit()
    t0 = time.perf_counter()
    loss1, new1, old = one_step(s, None)
    t1 = time.perf_counter()
    loss8, new8, _ = one_step(s, mesh)
    t8 = time.perf_counter()
    a1, a8, a0 = flat_adapters(new1), flat_adapters(new8), flat_adapters(old)
    diff, rel = compare(a8, a1, a0)
    emit("SGD, so the update is the gradient itself (Adam's first step, ±lr where |g| ≫ ε, would hide gradient")
    emit("differences). Relative: max |Δ| / max |update|.")
    emit()
    emit("| run | loss | max abs Δ adapters vs one device | relative to the update | wall s (compile + step) |")
    emit("|---|---:|---:|---:|---:|")
    emit(f"| one device | {loss1:.6f} | — | — | {t1 - t0:.0f} |")
    emit(f"| 8-device mesh (1 process) | {loss8:.6f} | {diff:.2e} | {rel:.2e} | {t8 - t1:.0f} |")
    if not args.no_processes:
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            two = run_two_processes(args.small, os.path.join(tmp, "two.npz"))
        d2, r2 = compare(two["adapters"], a1, a0)
        emit(f"| 2 processes × 4 devices, gloo over loopback | {two['loss']:.6f} | {d2:.2e} | {r2:.2e} | "
             f"{two['seconds']:.0f} |")  # fmt: skip
    emit()
    emit(f"Load average (1 min) when the run ended: {load_average()}.")
    text = emit.text
    if not args.no_write and not args.small:
        from benchmarks.report import write_section

        write_section("pod", text)
    return text


if __name__ == "__main__":
    main()

"""The pod-shaped model of benchmarks/pod.py: FSDP × tensor parallel on 8 forced host devices, adapters following kernels."""  # noqa: E501

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from benchmarks import pod


def test_adapters_follow_their_kernels_at_pod_size():
    """Abstract only: the 8-block width-1024 model's specs and per-device bytes (nothing is allocated)."""
    s = pod.Shape()
    assert s.depth >= 8 and s.width >= 1024 and s.fsdp * s.tensor == len(jax.devices()) == 8
    mesh = pod.make_mesh(s)
    specs = pod.param_specs(s, mesh)
    for i in range(s.depth):
        up, down = specs[f"block_{i}"]["mlp"]["up"], specs[f"block_{i}"]["mlp"]["down"]
        assert up["kernel"] == P("fsdp", "tensor") and down["kernel"] == P("tensor", "fsdp")
        assert up["lora_a"] == P("fsdp", None) and up["lora_b"] == P(None, "tensor")
        assert down["lora_a"] == P("tensor", None) and down["lora_b"] == P(None, "fsdp")
        assert up["lora_c"] == P(None, None) and up["lora_s"] == P(None, None)
        query = specs[f"block_{i}"]["attention"]["query"]
        assert query["lora_a"] == P("fsdp", None) and query["lora_b"] == P(None, "tensor")
    rows = pod.memory_table(s, mesh, compiled=False)
    total, device = rows["frozen base"]
    assert device / (total / 8) < 1.01  # the base is 1/8 per device (LayerNorm vectors are replicated or 1-D)
    total, device = rows["Adam state (adapters)"]
    assert device < total / 2  # A and B are each sharded along one mesh axis


@pytest.mark.slow
def test_mesh_step_matches_one_device():
    s = pod.SMALL
    loss1, new1, old = pod.one_step(s, None)
    loss8, new8, _ = pod.one_step(s, pod.make_mesh(s))
    np.testing.assert_allclose(loss8, loss1, rtol=1e-6)
    diff, rel = pod.compare(pod.flat_adapters(new8), pod.flat_adapters(new1), pod.flat_adapters(old))
    assert rel < 1e-5, (diff, rel)
    lora_b = new8.trainable["block_0"]["mlp"]["up"]["lora_b"]
    assert lora_b.sharding.spec == P(None, "tensor") and lora_b.addressable_shards[0].data.shape == (s.rank, s.mlp // 2)
    assert np.abs(pod.flat_adapters(new1)["['block_0']['mlp']['up']['lora_a']"]
                  - pod.flat_adapters(old)["['block_0']['mlp']['up']['lora_a']"]).max() > 0  # fmt: skip


@pytest.mark.slow
def test_two_processes_over_loopback_match_one_device(tmp_path):
    s = pod.SMALL
    loss1, new1, old = pod.one_step(s, None)
    two = pod.run_two_processes(True, str(tmp_path / "two.npz"), timeout=600)
    assert two["processes"] == 2 and two["devices"] == 8
    np.testing.assert_allclose(two["loss"], loss1, rtol=1e-6)
    diff, rel = pod.compare(two["adapters"], pod.flat_adapters(new1), pod.flat_adapters(old))
    assert rel < 1e-5, (diff, rel)


def test_quantised_base_keeps_the_layout():
    """An int8 base on the same mesh: kernels and adapters keep their specs; the base is a third of float32's."""
    import dataclasses

    from rssbl_jax import quantize

    s = dataclasses.replace(pod.SMALL, base="int8")
    mesh = pod.make_mesh(s)
    specs = pod.param_specs(s, mesh)
    up = specs["block_0"]["mlp"]["up"]
    assert quantize.quantized_kernels(up)["kernel"].qvalue == P("fsdp", "tensor")
    assert up["lora_a"] == P("fsdp", None) and up["lora_b"] == P(None, "tensor")
    quantised = pod.memory_table(s, mesh, compiled=False)["frozen base"][0]
    full = pod.memory_table(pod.SMALL, mesh, compiled=False)["frozen base"][0]
    assert quantised < 0.4 * full

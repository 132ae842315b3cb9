"""Bad input is refused with an error that names the parameter and the shapes; nothing is broadcast silently."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import rssbl_jax
from rssbl_jax import core


def test_merge_dense_refuses_factors_that_do_not_fit():
    kernel, bias = np.zeros((4, 3)), np.zeros(3)
    c, s, p0 = np.ones((1, 2)), np.ones((1, 2)), np.ones(1)
    with pytest.raises(ValueError, match=r"lora_b \(2, 1\).*kernel \(4, 3\)"):
        core.merge_dense(kernel, bias, np.ones((4, 2)), np.ones((2, 1)), c, s, p0, scale=1.0)
    with pytest.raises(ValueError, match=r"bias \(1,\)"):
        core.merge_dense(kernel, np.zeros(1), np.ones((4, 2)), np.ones((2, 3)), c, s, p0, scale=1.0)
    with pytest.raises(ValueError, match=r"lora_s \(2, 2\)"):
        core.merge_dense(kernel, bias, np.ones((4, 2)), np.ones((2, 3)), c, np.ones((2, 2)), p0, scale=1.0)


def test_rss_dense_refuses_a_bias_of_the_wrong_size():
    w, a, b, c, s = np.ones((4, 3)), np.ones((4, 2)), np.ones((2, 3)), np.ones((1, 2)), np.ones((1, 2))
    with pytest.raises(ValueError, match=r"bias must be \(d_out,\)=\(3,\); got bias.shape=\(1,\)"):
        core.rss_dense(np.ones((5, 4)), np.ones(1), w, np.ones(1), a, b, c, s, scale=1.0)


def test_alpha_pattern_that_matches_nothing_is_an_error(tmp_path):
    model = nn.Sequential([nn.Dense(8), nn.relu, nn.Dense(2)])
    adapted = rssbl_jax.inject(model, targets="layers_0", rank=2, lora_alpha=4.0)
    params = adapted.init(jax.random.key(0), jnp.ones((3, 5)), p=jnp.ones(2))["params"]
    wrong = adapted.config.replace(alpha_pattern={"model/layers_0": 8.0})
    with pytest.raises(ValueError, match=r"alpha_pattern \['model/layers_0'\] matches no adapted layer"):
        rssbl_jax.merge(params, jnp.ones(2), wrong)
    with pytest.raises(ValueError, match=r"alpha_pattern \['model/layers_0'\] matches no adapted layer"):
        rssbl_jax.save_adapters(tmp_path / "a", params, wrong)
    # the right pattern resolves
    merged = rssbl_jax.merge(params, jnp.ones(2), adapted.config.replace(alpha_pattern={"layers_0": 8.0}))
    assert merged["layers_0"]["kernel"].shape == (5, 8)


class ConvNet(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Conv(4, (3, 3), strides=2, name="conv")(x)


def test_injected_conv_reports_bad_p_against_its_input():
    adapted = rssbl_jax.inject(ConvNet(), targets="conv", rank=2, lora_alpha=2.0)
    x = jnp.ones((4, 8, 8, 3))
    variables = adapted.init(jax.random.key(0), x, p=jnp.ones((4, 2)))
    for bad in (jnp.ones((8, 2)), jnp.ones((4, 3))):
        with pytest.raises(ValueError) as info:
            jax.jit(lambda v, q: adapted.apply(v, x, p=q))(variables, bad)
        text = str(info.value)
        assert "'conv'" in text and "d_p=2" in text and str(tuple(x.shape)) in text and str(bad.shape) in text, text


def test_save_adapters_refuses_an_adapter_without_gate(tmp_path):
    params = {"dense": {"kernel": jnp.ones((3, 2)), "lora_a": jnp.ones((3, 1)), "lora_b": jnp.ones((1, 2))}}
    with pytest.raises(
        ValueError, match=r"'dense' is not an RSSBilinearLoRA adapter .*needs adapter leaves \['lora_c'\]"
    ):
        rssbl_jax.save_adapters(tmp_path / "a", params, rssbl_jax.AdapterConfig(rank=1, lora_alpha=1.0))


@pytest.mark.parametrize("gate", ["linear", "affine", "mlp"])
def test_the_linen_layer_names_the_d_p_of_its_own_leaves(gate):
    """After init, d_p comes from the layer's leaves (the MLP gate's lora_gate_w, not its lora_c (hidden, r))."""
    layer = rssbl_jax.RSSBilinearLoRADense(4, rank=2, lora_alpha=2.0, gate=gate, gate_hidden=8)
    variables = layer.init(jax.random.key(0), jnp.ones((3, 5)), jnp.ones(2))
    with pytest.raises(ValueError, match=r"RSSBilinearLoRADense: .*d_p=2.*\(3,\).*x.shape=\(3, 5\)"):
        layer.apply(variables, jnp.ones((3, 5)), jnp.ones(3))
    with pytest.raises(ValueError, match=r"RSSBilinearLoRADense: .*\(4, 2\).*d_p=2.*\(3,\)"):
        layer.apply(variables, jnp.ones((3, 5)), jnp.ones((4, 2)))
    assert layer.apply(variables, jnp.ones((3, 5)), jnp.ones((3, 2))).shape == (3, 4)

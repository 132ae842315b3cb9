"""The demo end to end on a tiny config: RSSBilinearLoRA recovers a planted conditional update; LoRA cannot."""

import math

import numpy as np
import pytest

from configs import demo as demo_config
from experiments import demo
from tests.test_training import read_events


@pytest.mark.slow  # ~20 s: make test-slow runs it
def test_demo_recovers_planted_update(tmp_path):
    config = demo_config.get_config()
    config.n_test_conditions = 8
    config.tensorboard_dir = str(tmp_path / "tb")
    results = demo.run(config)
    errors = results["errors"]
    assert set(errors) == {"frozen base", "LoRA r=4", "RSSBilinearLoRA r=4"}
    for split in ("seen", "interpolation", "extrapolation"):
        assert math.isclose(errors["frozen base"][split], 1.0, rel_tol=1e-6)  # the normaliser is the base itself
        assert errors["RSSBilinearLoRA r=4"][split] < 0.25, errors
        assert errors["LoRA r=4"][split] > 0.5, errors  # without p, LoRA can only fit the average condition
    assert results["update_cosine"]["median"] > 0.9
    assert results["trainable"]["RSSBilinearLoRA"] - results["trainable"]["LoRA"] == 2 * (2 * 2 * 4)
    text = demo.report(results)
    assert "RSSBilinearLoRA r=4" in text and "cosine" in text

    # The training curves went through the hook to TensorBoard: one folder per method, every log_every steps.
    logged_steps = list(range(config.log_every, config.adapt_steps + 1, config.log_every))
    for method, folder in (("RSSBilinearLoRA", "rss"), ("LoRA", "lora")):
        curve = results["curves"][method]
        assert [m["step"] for m in curve] == logged_steps
        assert curve[-1]["loss"] == results["adapt_final_mse"][method]
        events = read_events(tmp_path / "tb" / folder)
        for tag in ("loss", "grad_norm", "eval/interpolation_mse"):
            steps, values = zip(*[(s, v) for t, s, v in events if t == tag], strict=True)
            assert list(steps) == logged_steps, (method, tag)
            np.testing.assert_allclose(values, [m[tag] for m in curve], rtol=1e-6)
    rss, lora = (results["curves"][m] for m in ("RSSBilinearLoRA", "LoRA"))
    # RSS's held-out error falls by orders of magnitude as it trains; LoRA's cannot follow p and stays high.
    assert rss[-1]["eval/interpolation_mse"] < 1e-2 * rss[0]["eval/interpolation_mse"]
    assert lora[-1]["eval/interpolation_mse"] > 100 * rss[-1]["eval/interpolation_mse"]

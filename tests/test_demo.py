"""The demo end to end on a tiny config: RSSBilinearLoRA recovers a planted conditional update; LoRA cannot."""

import math

from configs import demo as demo_config
from experiments import demo


def test_demo_recovers_planted_update():
    config = demo_config.get_config()
    config.n_test_conditions = 8
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

"""The benchmark program runs end to end (tiny shapes; times are not asserted, they are not tests)."""

import re

import pytest

from benchmarks import run


@pytest.mark.slow
def test_benchmarks_smoke():
    text = run.main(["--smoke", "--no-write"])
    for section in ("## 1.", "## 2.", "## 3.", "## 4.", "## 5.", "## Targets"):
        assert section in text
    for name in ("dense", "lora_ours", "rss", "film_branch", "hypernet", "nnx.LoRALinear", "qwix LoRA"):
        assert f"| {name} |" in text
    targets = text.split("## Targets")[1]
    values = [float(v) for v in re.findall(r"\| ([0-9]+\.[0-9]+) \|", targets)]
    assert len(values) >= 10 and all(v > 0 for v in values)


def test_flop_floor_and_slope():
    assert run.flop_floor(1024, 1024, 16) == 1 + 16 * 2048 / 1024**2
    assert abs(run.slope([1, 2, 4, 8], [3, 12, 48, 192]) - 2.0) < 1e-9


def test_quick_mode_never_writes_the_committed_benchmarks():
    assert run.output_path(full=True) == run.ROOT / "BENCHMARKS.md"
    quick = run.output_path(full=False)
    assert quick.name == "BENCHMARKS.quick.md" and quick.parent == run.ROOT / "runs" / "bench"

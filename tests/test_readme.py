"""Every Python block of the README runs as written (each block on its own, in a fresh namespace)."""

import pathlib
import re

import pytest

README = (pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text()
BLOCKS = re.findall(r"```python\n(.*?)```", README, re.S)


def test_readme_has_the_examples():
    assert len(BLOCKS) >= 4
    assert any("rssbl_jax.inject(" in b for b in BLOCKS) and any("rssbl_jax.nnx.inject(" in b for b in BLOCKS)
    assert any("adapter_partition_specs" in b for b in BLOCKS)


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_block_runs(index):
    namespace: dict = {"__name__": f"readme_block_{index}"}
    exec(compile(BLOCKS[index], f"README.md block {index}", "exec"), namespace)

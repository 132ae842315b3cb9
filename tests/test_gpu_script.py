"""benchmarks/gpu.py runs without a GPU when asked (--allow-cpu): its agreement check and report logic are exercised."""

import jax
import pytest

from benchmarks import gpu


@pytest.mark.slow  # ~15 s: make test-slow runs it
def test_agreement_check_runs_on_cpu(capsys):
    assert gpu.main(["--check-only", "--allow-cpu"]) == 0
    out = capsys.readouterr().out
    assert "| inject forward | highest |" in out and "| int8 base (qwix) | default |" in out


def test_refuses_without_a_gpu_unless_allowed(monkeypatch):
    # only the CPU is visible, whatever this machine has
    cpu = jax.devices("cpu")
    monkeypatch.setattr(jax, "devices", lambda *args, **kwargs: cpu)
    assert gpu.main(["--check-only"]) == 2

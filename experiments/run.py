"""Command line: ``python -m experiments.run --config configs/default.py --workdir runs/default``.

Any config field can be overridden, e.g. ``--config.seed=3 --config.num_seeds=10``. Prints the report tables;
wall times go to ``timing.json`` in the workdir (the report itself is deterministic on CPU).
"""

from __future__ import annotations

from absl import app, flags
from ml_collections import config_flags

from experiments import report, train

_CONFIG = config_flags.DEFINE_config_file("config", "configs/default.py", "A config file with get_config().")
_WORKDIR = flags.DEFINE_string("workdir", "runs/default", "Where metrics, report and plots are written.")


def main(argv: list[str]) -> None:
    del argv
    summary = train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
    print(report.tables(summary, _CONFIG.value))
    print(f"report: {_WORKDIR.value}/report.md ({summary['seconds']:.0f} s)")


if __name__ == "__main__":
    app.run(main)

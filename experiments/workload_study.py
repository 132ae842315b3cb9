r"""The workload study with independent draws: pre-registered methods on KS and the battery, draw-level statistics.

    python -m experiments.workload_study --config configs/workload_study.py --workdir results/workload_study

(the parts, their commands and times: ``configs/workload_study.py`` and RESULTS.md). Protocol:

1. **Draws.** Draw ``d`` has its own data seed and pretraining seed (:func:`experiments.workloads.load_workload`
   with ``draw=d``): fresh training and held-out conditions, fresh trajectories (KS) or load profiles (battery),
   and a base re-pretrained at the nominal condition. Within a draw, the trajectories of every training
   condition split once into training and validation trajectories.
2. **Tuning.** Seed 0 trains every learning rate of the grid (five points); the lowest validation loss picks the
   rate, and a pick at an edge adds one more point beyond it (``extend_edges`` times at most). Seeds
   ``1..seeds_at_lr`` then train at the chosen rate. Reported per draw: the runs at the chosen rate.
3. **Training.** :func:`experiments.workloads.run_method` (Adam, global-norm clip 1, cosine decay to 0, the same
   number of steps and batch size for every method); the validation loss of every run is recorded at
   ``val_points`` evenly spaced steps.
4. **Statistics** (:mod:`experiments.stats`): each run's error is its mean over the set's conditions; errors form
   ``[draws, seeds]`` arrays; intervals and paired ratios run over the draws' means (``draws - 1`` degrees of
   freedom); significance marks are Holm–Bonferroni-corrected over each ratio table.
5. **Convergence** (part ``convergence``): draw 0 again with ``convergence_factor`` times the steps for
   ``convergence_methods``, every rate of the grid. The criterion: the budget counts as converged for a method
   when its held-out error at the longer budget is within 10 % of the shorter one's (both at their own chosen
   rate, mean over the same seeds).
6. **Budgets** (part ``budgets``, records only): each method's error at every budget paired with the budget before
   on the same base, draws and seeds (:func:`budget_table`), the criterion above per draw and as a TOST interval.

Records: ``<workload>_draw<d>.jsonl`` (one per method, with the UTC time its run began; methods added to the same
part later go to ``<workload>_draw<d>_<records_tag>.jsonl``, and a method is tabulated once every draw has it) and
``<workload>_convergence.jsonl``; ``report.md`` is rebuilt from every record in the workdir after each part
(``--config.part=render`` only rebuilds it).
"""

from __future__ import annotations

import dataclasses
import datetime
import itertools
import json
import pathlib
import re
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402

from experiments import physics_data, stats, surrogates, workloads  # noqa: E402
from experiments import report as report_lib  # noqa: E402

SETS = ("train", "heldout", "extrapolated", "nominal")
CONVERGED = stats.CONVERGED  # the convergence criterion: held-out error within 10 % when the budget doubles
EQUIVALENCE = 0.10  # a tie shown by TOST: the paired ratio within [1/1.1, 1.1]
LEVEL = 0.03  # "level" in the matched-parameter tables: TOST shows the paired ratio within [1/1.03, 1.03]


def _sub(config: ml_collections.ConfigDict, steps_factor: int = 1) -> ml_collections.ConfigDict:
    """The per-draw config of :func:`experiments.workloads.run_method`: one trajectory split per draw."""
    sub = ml_collections.ConfigDict(config.to_dict())
    sub.draws = 1
    for name in ("ks", "battery"):
        sub[name].steps = int(config[name].steps) * steps_factor
    return sub


def _write(path: pathlib.Path, records: list[dict]) -> None:
    """Rewrite ``path`` with ``records`` (a temporary file renamed over it: a crash leaves the old file)."""
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
    tmp.replace(path)


def run(config: ml_collections.ConfigDict, workdir: str | pathlib.Path, data_dir: str | None = None) -> float:
    """Train the config's part (``main`` or ``convergence``) into ``workdir``; rebuild ``report.md``."""
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    part = config.get("part", "main")
    if part not in ("main", "ablation", "convergence", "base", "budgets", "render"):
        raise ValueError(
            f"unknown part {part!r}; expected 'main', 'ablation', 'convergence', 'base', 'budgets' or 'render'."
        )
    if part == "budgets":
        write_budget_report(workdir, config.budget_workdirs)
        return time.perf_counter() - start
    run_draws = tuple(config.get("run_draws", range(config.draws)))
    if not run_draws or any(d not in range(config.draws) for d in run_draws):
        raise ValueError(f"run_draws must name draws in 0..{config.draws - 1}; got {run_draws}.")
    for name in config.workloads if part != "render" else ():
        draws = run_draws if part in ("main", "ablation", "base") else range(1)
        if part == "base":
            _base_part(config, name, draws, workdir, data_dir)
            continue
        methods = {"main": config.methods, "ablation": config.get("ablation_methods", ())}.get(
            part, ("frozen", *config.convergence_methods)
        )
        sub = _sub(config, int(config.convergence_factor) if part == "convergence" else 1)
        for draw in draws:
            t = time.perf_counter()
            work = workloads.load_workload(name, sub, data_dir, draw=draw)
            load_s = time.perf_counter() - t
            records = []
            for method in methods:
                started = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
                record = workloads.run_method(work, method, "all", sub, seed=draw)
                # started_utc: set against the config's commit time, it shows the run came after it
                record |= {"draw": draw, "part": part, "data_and_base_s": load_s, "started_utc": started,
                           "pretrain_steps": work.pretrain_config.steps}  # fmt: skip
                records.append(record)
                if config.get("progress", False):
                    print(f"{name} draw {draw} {method}: {record['seconds']:.0f} s", flush=True)
            tag = f"ablation_{config.ablation_tag}" if config.get("ablation_tag") else "ablation"  # a later set
            more = f"_{config.records_tag}" if config.get("records_tag") else ""  # methods added to a main part
            suffix = {"main": f"draw{draw}{more}", "ablation": f"{tag}_draw{draw}"}.get(part, "convergence")
            _write(workdir / f"{name}_{suffix}.jsonl", records)
    seconds = time.perf_counter() - start
    write_report(workdir)
    return seconds


def _fresh_nominal(name: str, config, data_dir: str | None, draw: int, work: workloads.Workload) -> dict:
    """The nominal trajectories of the next draw (``(draw + 1) % draws``): the same nominal condition, trajectories
    from another data seed, so none of them is among the ones ``draw``'s base was pretrained on."""
    nxt = (draw + 1) % config.draws
    other = physics_data.split(
        surrogates.load_data(workloads._surrogate_config(name, config, nxt), data_dir), "nominal"
    )
    mine = work.sets["nominal"]
    if not np.array_equal(other["conditions"], mine["conditions"]):
        raise ValueError(f"draw {nxt}'s nominal conditions differ from draw {draw}'s.")
    key = "u" if name == "ks" else "x"
    if any(np.array_equal(a, b) for a in other[key][0] for b in mine[key][0]):
        raise ValueError(f"draw {nxt} shares a nominal trajectory with draw {draw}.")
    return other


def _has_fresh(records: list[dict]) -> bool:
    """Whether every base-part record carries the fresh-nominal metrics (older records do not)."""
    return all("nominal_fresh" in r["metrics"] for r in records)


def _base_part(config, name: str, draws, workdir: pathlib.Path, data_dir: str | None) -> None:
    """Part ``base``: each draw's frozen base pretrained for ``base_factors`` times the config's budget (the
    surrogate's own unless ``<workload>.pretrain_steps`` names one), evaluated on every set
    (``<workload>_base_draw<d>.jsonl``). With ``draws > 1`` also on fresh nominal trajectories (metrics set
    ``nominal_fresh``, :func:`_fresh_nominal`): the nominal set is among the base's pretraining trajectories, so its
    error alone cannot tell fitting those from learning the nominal system."""
    own = config[name].get("pretrain_steps") or surrogates.SURROGATES[f"{name}_transformer"].steps
    for draw in draws:
        records, fresh_nominal = [], None  # the next draw's nominal data: the same at every budget, loaded once
        for factor in config.base_factors:
            sub = _sub(config)
            sub[name].pretrain_steps = int(factor * own)
            t = time.perf_counter()
            work = workloads.load_workload(name, sub, data_dir, draw=draw)
            record = workloads.run_method(work, "frozen", "all", sub, seed=draw)
            if config.draws > 1:
                if fresh_nominal is None:
                    fresh_nominal = _fresh_nominal(name, config, data_dir, draw, work)
                fresh = dataclasses.replace(work, sets=work.sets | {"nominal": fresh_nominal})
                record["metrics"]["nominal_fresh"] = workloads.run_method(fresh, "frozen", "all", sub, seed=draw)[
                    "metrics"]["nominal"]  # fmt: skip
            record |= {"draw": draw, "part": "base", "data_and_base_s": time.perf_counter() - t,
                       "pretrain_steps": work.pretrain_config.steps}  # fmt: skip
            records.append(record)
            if config.get("progress", False):
                print(f"{name} draw {draw} base pretrained {work.pretrain_config.steps} steps", flush=True)
        _write(workdir / f"{name}_base_draw{draw}.jsonl", records)


# ------------------------------------------------------------------------------------------------ report


def read(workdir: str | pathlib.Path) -> dict[str, dict[str, list[dict]]]:
    """``{workload: {"main": [...], "convergence": [...]}}`` from the workdir's records."""
    out: dict[str, dict[str, list[dict]]] = {}
    for path in sorted(pathlib.Path(workdir).glob("*.jsonl")):
        for line in path.read_text().splitlines():
            r = json.loads(line)
            tag = re.fullmatch(r".+_draw\d+_(.+)\.jsonl", path.name)  # records_tag: a later set of main methods
            if tag and r["part"] == "main":
                r["records_tag"] = tag.group(1)
            out.setdefault(r["workload"], {}).setdefault(r["part"], []).append(r)
    return out


def errors(records: list[dict], method: str, set_name: str, metric: str) -> np.ndarray:
    """``[draws, seeds]``: each run's error averaged over the set's conditions, draws in order (every draw of the
    records; a method missing from one, or with another number of seeds than the others, is refused, so paired
    ratios never pair different draws or seeds)."""
    draws = sorted({r["draw"] for r in records})
    rows = sorted((r for r in records if r["method"] == method), key=lambda r: r["draw"])
    if [r["draw"] for r in rows] != draws:
        raise ValueError(f"{method}: records for draws {[r['draw'] for r in rows]}, expected one per draw {draws}.")
    per_draw = [np.asarray(r["metrics"][set_name][metric], np.float64) for r in rows]
    if len({a.shape[0] for a in per_draw}) != 1:
        raise ValueError(f"{method}: {[a.shape[0] for a in per_draw]} runs per draw; expected the same in every draw.")
    return np.stack([a.reshape(a.shape[0], a.shape[1], -1).mean(axis=(1, 2)) for a in per_draw])


def _methods(records: list[dict]) -> list[str]:
    return list(dict.fromkeys(r["method"] for r in records))


def error_table(records: list[dict], metric: str) -> list[str]:
    """Absolute errors per set: draw-level mean ± 95 % half-width [median over draws × seeds]."""
    head = "| method | trainable | " + " | ".join(SETS) + " |"
    lines = [head, "|---|---:|" + "---|" * len(SETS)]
    for m in _methods(records):
        trainable = next(r["trainable"] for r in records if r["method"] == m)
        lines.append(f"| {m} | {trainable} | " + " | ".join(report_lib._cell(errors(records, m, s, metric))
                                                          for s in SETS) + " |")  # fmt: skip
    return lines


def _set_rows(methods: list[str], cells: list[str]) -> list[str]:
    """A table with one row per method and one column per set of :data:`SETS`, ``cells`` in that order."""
    k = len(SETS)
    rows = [f"| {m} | " + " | ".join(cells[i * k : (i + 1) * k]) + " |" for i, m in enumerate(methods)]
    return ["| method | " + " | ".join(SETS) + " |", "|---|" + "---|" * k, *rows]


def ratio_table(records: list[dict], metric: str, reference: str, cells=report_lib.holm_ratios) -> list[str]:
    """Paired ratios method / reference per set, Holm-corrected over the table (every method × set); ``cells``
    turns the table's ``[(errors, reference), ...]`` pairs into its cells (default: the paired ratios)."""
    others = [m for m in _methods(records) if m not in (reference, "frozen")]
    pairs = [(errors(records, m, s, metric), errors(records, reference, s, metric)) for m in others for s in SETS]
    if any(a.shape != b.shape for a, b in pairs):
        raise ValueError(f"paired ratios against {reference}: the methods' [draws, seeds] shapes differ.")
    row = cells(pairs)
    return _set_rows(others, row)


def equivalence_table(records: list[dict], metric: str, reference: str, margin: float = EQUIVALENCE) -> list[str]:
    """Per method and set: the 90 % draw-level interval of method / reference, **≈** when TOST shows the ratio
    within ``[1/(1+margin), 1+margin]`` after a Holm correction over the table."""
    return ratio_table(records, metric, reference, lambda pairs: report_lib.holm_equivalence(pairs, margin))


def per_draw_table(records: list[dict], metric: str, reference: str, set_name: str = "heldout") -> list[str]:
    """Per method and draw: the mean error over seeds, and the geometric-mean ratio to ``reference`` over seeds."""
    draws = sorted({r["draw"] for r in records})
    ref = errors(records, reference, set_name, metric) if any(r["method"] == reference for r in records) else None
    lines = ["| method | " + " | ".join(f"draw {d}" for d in draws) + " |", "|---|" + "---:|" * len(draws)]
    for m in (m for m in _methods(records) if m != "frozen"):
        e = errors(records, m, set_name, metric)
        cells = [f"{v:.4g}" for v in e.mean(axis=1)]
        if ref is not None and m != reference:
            ratios = stats.per_draw_ratio(e, ref)
            cells = [f"{c} ({q:.3g})" for c, q in zip(cells, ratios, strict=True)]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return lines


def persistence_table(records: list[dict]) -> list[str]:
    """KS: the frozen base against persistence (no change), one-step and rollout, draw-level intervals."""
    frozen = [r for r in records if r["method"] == "frozen"]
    if not frozen or "persistence" not in frozen[0]["metrics"]["train"]:
        return []
    lines = ["| set | base 1-step | persistence 1-step | base rollout | persistence rollout |", "|---|---|---|---|---|"]
    for s in SETS:
        keys = ("one_step", "persistence", "rollout_mean", "rollout_persistence_mean")
        lines.append(f"| {s} | " + " | ".join(report_lib._cell(errors(frozen, "frozen", s, k)) for k in keys) + " |")
    return lines


def base_table(records: list[dict], metric: str) -> list[str]:
    """Part ``base``: the frozen base's error per set at each pretraining budget (draw-level mean ± half-width),
    and its paired ratio to the smallest budget, Holm-corrected over the table."""
    steps = sorted({r["pretrain_steps"] for r in records})
    sets = SETS + (("nominal_fresh",) if _has_fresh(records) else ())
    at = {n: {s: errors([r for r in records if r["pretrain_steps"] == n], "frozen", s, metric) for s in sets}
          for n in steps}  # fmt: skip
    # a budget that fewer draws ran pairs with the smallest budget on those draws only (never broadcast over draws)
    draws = {n: sorted({r["draw"] for r in records if r["pretrain_steps"] == n}) for n in steps}
    first = {n: [draws[steps[0]].index(d) for d in draws[n]] for n in steps}
    ratios = report_lib.holm_ratios([(at[n][s], at[steps[0]][s][first[n]]) for n in steps[1:] for s in sets])
    lines = ["| pretraining steps | " + " | ".join(sets) + " | " + " | ".join(f"/ {steps[0]}: {s}" for s in sets)
             + " |", "|---:|" + "---|" * 2 * len(sets)]  # fmt: skip
    for i, n in enumerate(steps):
        cells = [report_lib._cell(at[n][s]) for s in sets]
        cells += ratios[(i - 1) * len(sets) : i * len(sets)] if i else ["1"] * len(sets)
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    return lines


def tuning_table(records: list[dict]) -> list[str]:
    """Per method and draw: the grid (with any edge extension), the chosen rate, and its validation loss."""
    lines = ["| method | draw | grid | chosen | edge after extension | validation loss at the chosen rate |",
             "|---|---:|---|---:|---|---:|"]  # fmt: skip
    for r in sorted((r for r in records if r["lr"]), key=lambda r: (_methods(records).index(r["method"]), r["draw"])):
        grid = ", ".join(f"{v:g}" for v in r["lr_grid"])
        val = r["val_loss_by_lr"][f"{r['lr'][0]:g}"][0]
        lines.append(f"| {r['method']} | {r['draw']} | {grid} | {r['lr'][0]:g} | {'yes' if r['edge'] else 'no'} | "
                     f"{val:.4g} |")  # fmt: skip
    return lines


def curve_table(records: list[dict]) -> list[str]:
    """The validation loss of the chosen-rate runs along training (mean over draws and seeds), as a fraction of
    its final value: a flat tail is near 1.00 over the last points."""
    lines = []
    for r in records:
        if "val_curve" not in r:
            continue
        curve = r["val_curve"]
        chosen = [i for i, run in enumerate(curve["runs"]) if abs(run[2] - r["lr"][0]) < 1e-12]
        lines.append((r["method"], curve["steps"], np.asarray(curve["by_run"], np.float64)[chosen].mean(axis=0)))
    if not lines:
        return []
    by_method: dict[str, list] = {}
    for m, _, c in lines:
        by_method.setdefault(m, []).append(c)
    steps = lines[0][1]
    out = ["| method | " + " | ".join(str(s) for s in steps) + " |", "|---|" + "---:|" * len(steps)]
    for m, curves in by_method.items():
        c = np.mean(curves, axis=0)
        out.append(f"| {m} | " + " | ".join(f"{v / c[-1]:.2f}" for v in c) + " |")
    return out


def convergence_table(main: list[dict], longer: list[dict], metric: str) -> list[str]:
    """Draw 0: held-out error at the budget and at the longer budget (each at its own chosen rate)."""
    lines = ["| method | steps | held-out | steps × factor | held-out | change | converged (within 10 %) |",
             "|---|---:|---:|---:|---:|---:|---|"]  # fmt: skip
    for m in _methods(longer):
        a = [r for r in main if r["method"] == m and r["draw"] == 0]
        b = [r for r in longer if r["method"] == m]
        if not a or not b or m == "frozen":
            continue
        ea = np.mean(errors(a, m, "heldout", metric))
        eb = np.mean(errors(b, m, "heldout", metric))
        change = eb / ea - 1
        verdict = "yes" if abs(change) <= CONVERGED else "no"
        lines.append(f"| {m} | {a[0]['steps']} (lr {a[0]['lr'][0]:g}) | {ea:.4g} | {b[0]['steps']} "
                     f"(lr {b[0]['lr'][0]:g}) | {eb:.4g} | {change:+.1%} | {verdict} |")  # fmt: skip
    return lines


DIVERGED = 10.0  # a chosen-rate run whose final validation loss exceeds 10x the median of its method's on the draw


def diverged_runs(records: list[dict]) -> dict[tuple[str, int], list[int]]:
    """``{(method, draw): [seed positions]}``: the chosen-rate runs whose final validation loss is more than
    :data:`DIVERGED` times the median of the method's chosen-rate runs on that draw (positions on the axis of seeds
    of :func:`errors`)."""
    out = {}
    for r in records:
        if "val_curve" not in r or not r["lr"]:
            continue
        final = {tuple(run): c[-1] for run, c in zip(r["val_curve"]["runs"], r["val_curve"]["by_run"], strict=True)}
        losses = np.array([final[tuple(run)] for run in r["runs"]])  # in the order of the metrics' seed axis
        bad = [i for i, v in enumerate(losses) if v > DIVERGED * np.median(losses)]
        if bad:
            out[(r["method"], r["draw"])] = bad
    return out


def without_diverged_table(records: list[dict], metric: str, reference: str = "rss") -> list[str]:
    """The paired ratios method / ``reference`` again with each diverged run (:func:`diverged_runs`) and its pair
    left out: per draw, the mean log ratio over the remaining seeds; interval over draws and Holm as above."""
    bad = diverged_runs(records)
    others = [m for m in _methods(records) if m not in (reference, "frozen")]
    draws = sorted({r["draw"] for r in records})
    pairs = []
    for m in others:
        left_out = [bad.get((m, d), []) + bad.get((reference, d), []) for d in draws]
        for s in SETS:
            logs = np.log(errors(records, m, s, metric) / errors(records, reference, s, metric))
            keep = [[i for i in range(logs.shape[1]) if i not in out] for out in left_out]
            per_draw = np.exp([logs[j, k].mean() for j, k in enumerate(keep)])[:, None]
            pairs.append((per_draw, np.ones_like(per_draw)))
    row = report_lib.holm_ratios(pairs)
    return _set_rows(others, row)


def cost_table(records: list[dict]) -> list[str]:
    lines = ["| method | trainable | ms/step/run | XLA MB (vmapped step) |", "|---|---:|---:|---:|"]
    for m in _methods(records):
        rows = [r for r in records if r["method"] == m]
        ms = np.median([r["step_ms_per_run"] for r in rows])
        mb = [r["memory_mb"] for r in rows if r.get("memory_mb")]
        lines.append(f"| {m} | {rows[0]['trainable']} | {ms:.1f} | {np.median(mb):.0f} |" if mb else
                     f"| {m} | {rows[0]['trainable']} | – | – |")  # fmt: skip
    return lines


def plot(records: list[dict], metric: str, path: pathlib.Path) -> None:
    """Held-out and extrapolated error per method: draw means (dots) and the draw-level mean."""
    methods = _methods(records)
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    for ax, s in zip(axes, ("heldout", "extrapolated"), strict=True):
        for i, m in enumerate(methods):
            e = errors(records, m, s, metric).mean(axis=1)
            ax.scatter(np.full(e.shape, i), e, s=14, color="tab:blue")
            ax.scatter([i], [e.mean()], marker="_", s=300, color="black")
        ax.set_xticks(range(len(methods)), methods, rotation=60, ha="right", fontsize=8)
        ax.set_yscale("log")
        ax.set_title(f"{s} {metric} (dots: draws)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def budget_chains(workdirs) -> dict[tuple[str, int], list[tuple[int, list[dict]]]]:
    """``{(workload, pretraining steps): [(steps, main records), ...]}``, budgets in increasing order, from the main
    records of every workdir (records from before ``pretrain_steps`` was recorded used the surrogate's own budget).
    Two workdirs with the same workload, base and budget are refused: a chain has one record set per budget."""
    found: dict[tuple[str, int], dict[int, list[dict]]] = {}
    for workdir in workdirs:
        for name, parts in read(workdir).items():
            trained = [r for r in parts.get("main", []) if r["method"] != "frozen"]
            for steps in sorted({r["steps"] for r in trained}):
                at = [r for r in parts["main"] if r["method"] == "frozen" or r["steps"] == steps]
                base = trained[0].get("pretrain_steps") or surrogates.SURROGATES[f"{name}_transformer"].steps
                chain = found.setdefault((name, base), {})
                if steps in chain:
                    raise ValueError(f"{name}, base {base} steps: two record sets at {steps} steps ({workdir}).")
                chain[steps] = at
    return {key: sorted(chain.items()) for key, chain in sorted(found.items())}


def _common_draws(a: list[dict], b: list[dict], metric: str) -> tuple[list[dict], list[dict]]:
    """The records of the draws both sets ran (one set may run fewer draws); refused when the frozen bases differ,
    so a chain never pairs adaptations of different bases."""
    draws = sorted({r["draw"] for r in a} & {r["draw"] for r in b})
    a, b = ([r for r in x if r["draw"] in draws] for x in (a, b))
    for s in SETS:
        if not np.allclose(errors(a, "frozen", s, metric), errors(b, "frozen", s, metric), rtol=1e-5):
            raise ValueError(f"the frozen base's {s} {metric} error differs between budgets: not the same base.")
    return a, b


BUDGET_SETS = ("heldout", "extrapolated")  # the criterion's set, and the one furthest from the training data


def budget_table(chain: list[tuple[int, list[dict]]], metric: str, cells=report_lib.holm_ratios) -> list[str]:
    """Per method and step of the chain: its error at the larger budget / at the smaller one, paired on the draws
    and seeds both ran (each budget at its own chosen rate), one cell per set of :data:`BUDGET_SETS`; ``cells``
    makes the table's cells from its ``[(errors, reference), ...]`` pairs (default: ratios, Holm-corrected over
    the table). A method that skipped budgets pairs its own consecutive ones (``600 → 4800``). A step that fewer
    than 2 draws ran has no interval and is left out."""
    rows, pairs = [], []
    for i, j in itertools.combinations(range(len(chain)), 2):  # in order: (0, 1), (0, 2), ..., (1, 2), ...
        (n0, r0), (n1, r1) = chain[i], chain[j]
        between = {m for _, r in chain[i + 1 : j] for m in _methods(r)}
        r0, r1 = _common_draws(r0, r1, metric)
        draws = sorted({r["draw"] for r in r0})
        if len(draws) < 2:
            continue
        for m in (m for m in _methods(r1) if m != "frozen" and m in _methods(r0) and m not in between):
            rows.append(f"| {m} | {n0} → {n1} | {len(draws)} |")
            pairs += [(errors(r1, m, s, metric), errors(r0, m, s, metric)) for s in BUDGET_SETS]
    made = cells(pairs)
    for i, (a, b) in enumerate(pairs):  # the criterion, on held-out: every draw's mean over seeds within CONVERGED
        if BUDGET_SETS[i % len(BUDGET_SETS)] == "heldout" and np.all(np.abs(a.mean(1) / b.mean(1) - 1) < CONVERGED):
            made[i] += " ✓"
    k = len(BUDGET_SETS)
    lines = ["| method | steps | draws | " + " | ".join(BUDGET_SETS) + " |", "|---|---|---:|" + "---|" * k]
    return lines + [f"{row} {' | '.join(made[i * k : (i + 1) * k])} |" for i, row in enumerate(rows)]


def write_budget_report(workdir: str | pathlib.Path, workdirs) -> pathlib.Path:
    """``report.md`` in ``workdir``: :func:`budget_table` for every chain of budgets found in ``workdirs``."""
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    out = ["# The error against the step budget, paired across budgets", "",
           f"Records from {', '.join(f'`{w}`' for w in workdirs)}. Each row: a method's error at the larger budget "
           "divided by its error at the smaller, on the same base, draws and seeds (each budget at its own chosen "
           "learning rate); geometric-mean paired ratio [95 % draw-level interval], marks Holm-corrected over each "
           f"table; ✓: the convergence criterion holds (the held-out error, mean over seeds, changes by less than "
           f"{CONVERGED:.0%} on every draw; stated for a doubling, so a larger step is a stricter test). The "
           "equivalence tables test the same margin as an interval: 90 % draw-level interval, **≈** when TOST shows "
           f"the ratio within [{1 / (1 + CONVERGED):.3f}, {1 + CONVERGED:.2f}] after Holm over the table.",
           ""]  # fmt: skip
    for (name, base), chain in budget_chains(workdirs).items():
        metric = workloads.METRICS[name][0]
        out += [f"## {name}, base pretrained {base} steps: budgets {', '.join(str(n) for n, _ in chain)}", "",
                f"### {metric}: later budget / earlier budget", "", *budget_table(chain, metric), "",
                f"### {metric}: equivalence within ±{CONVERGED:.0%}", "",
                *budget_table(chain, metric, lambda p: report_lib.holm_equivalence(p, CONVERGED)), ""]  # fmt: skip
    path = workdir / "report.md"
    path.write_text("\n".join(out))
    return path


def _method_tables(name: str, main: list[dict], draws: list[int], persistence: bool = False) -> list[str]:
    """The tables of one Holm family of methods: errors, paired ratios, per draw, without diverged runs, TOST, the
    frozen base against persistence (``persistence``: once per workload, it does not depend on the family), tuning
    and the validation curves."""
    out: list[str] = []
    for metric in workloads.METRICS[name]:
        out += [f"### {metric}: absolute error", "", *error_table(main, metric), ""]
        for ref in ("rss", "rss_affine"):
            if any(r["method"] == ref for r in main):
                out += [f"### {metric}: paired ratio method / `{ref}`", "", *ratio_table(main, metric, ref), ""]
        if len(draws) > 2 and metric == workloads.METRICS[name][0]:
            later = [r for r in main if r["draw"] != draws[0]]
            out += [f"### {metric}: paired ratio method / `rss` without draw {draws[0]}", "",
                    f"Draw {draws[0]} is the workloads' default data and base, which the single-draw anchoring "
                    "study had seen before this protocol was fixed; the same table over the other draws only "
                    f"(intervals over {len(draws) - 1} draws).", "",
                    *ratio_table(later, metric, "rss"), ""]  # fmt: skip
        if metric == workloads.METRICS[name][0]:
            out += [f"### {metric}, held-out, per draw: mean over seeds (geometric mean over seeds of the "
                    "ratio to `rss`)", "", *per_draw_table(main, metric, "rss"), ""]  # fmt: skip
            bad = diverged_runs(main)
            if bad and any(r["method"] == "rss" for r in main):
                out += [f"### {metric}: paired ratio method / `rss` without the runs that diverged", "",
                        "Diverged (final validation loss over "
                        f"{DIVERGED:g}× the median of the method's chosen-rate runs on the draw): "
                        + "; ".join(f"`{m}` draw {d} seed {', '.join(map(str, i))}" for (m, d), i in bad.items())
                        + ". Each is left out with its pair; a check added after such a run was seen, not part "
                        "of the pre-registered comparison.", "",
                        *without_diverged_table(main, metric), ""]  # fmt: skip
        out += [f"### {metric}: equivalence to `rss` within ±{EQUIVALENCE:.0%} (TOST)", "",
                "90 % draw-level interval of method / `rss`; **≈**: the ratio is shown to lie in "
                f"[{1 / (1 + EQUIVALENCE):.3f}, {1 + EQUIVALENCE:.2f}] (two one-sided tests, Holm-corrected over "
                "the table). No mark means equivalence is not shown, not that a difference is.", "",
                *equivalence_table(main, metric, "rss"), ""]  # fmt: skip
    if persistence:
        out += ["### The frozen base against persistence (relative L2)", "", *persistence_table(main), ""]
    out += ["### Learning-rate tuning (seed 0 of each draw)", "", *tuning_table(main), ""]
    curve = curve_table(main)
    if curve:
        out += ["### Validation loss along training (chosen rate; fraction of the final value)", "", *curve, ""]
    return out


def write_report(workdir: str | pathlib.Path) -> pathlib.Path:
    """``report.md`` (and one plot per workload) from every record in ``workdir``."""
    workdir = pathlib.Path(workdir)
    out = ["# Workloads with independent draws", "",
           "Cells: mean over draws of the per-draw mean ± half-width of the 95 % t-interval over draws "
           "[median over draws × seeds]. Ratios: geometric-mean paired ratio [95 % draw-level interval], marks "
           "Holm-corrected over each table.", ""]  # fmt: skip
    for name, parts in read(workdir).items():
        if parts.get("base"):
            out += [f"## {name}: the frozen base against its pretraining budget", "",
                    f"{len({r['draw'] for r in parts['base']})} draws; the same data, "
                    "seed, learning rate, warm-up and cosine schedule at every budget. The `nominal` set is among "
                    "the base's pretraining data" + ("; `nominal_fresh` is the next draw's nominal trajectories, "
                    "which it never saw." if _has_fresh(parts["base"]) else "."),
                    ""]  # fmt: skip
            for metric in workloads.METRICS[name]:
                out += [f"### {metric}", "", *base_table(parts["base"], metric), ""]
        main = parts.get("main", [])
        if not main:
            continue
        draws = sorted({r["draw"] for r in main})
        partial = [m for m in _methods(main) if sorted(r["draw"] for r in main if r["method"] == m) != draws]
        main = [r for r in main if r["method"] not in partial]  # tabulated once every draw has run
        seeds = {len(r["runs"]) for r in main if r["method"] != "frozen"}
        trained = next(r for r in main if r["method"] != "frozen")
        seconds = sum(r["seconds"] for r in main) + sum(
            next(r["data_and_base_s"] for r in main if r["draw"] == d) for d in draws
        )
        anchor = trained.get("anchor", "none")
        # records from before the field was added used the surrogates' own pretraining budget
        base = f"; base pretrained {trained['pretrain_steps']} steps" if "pretrain_steps" in trained else ""
        out += [f"## {name}", "", f"{len(draws)} draws × {sorted(seeds)} seeds at the chosen rate; "
                f"{trained['steps']} steps of batch {trained['batch']}{base}; anchor `{anchor}`; training and "
                f"evaluation {seconds / 60:.1f} min (sum over records, data and bases included).", ""]  # fmt: skip
        if partial:
            out += [f"Not tabulated until every draw has run: {', '.join(f'`{m}`' for m in partial)}.", ""]
        added = [r for r in main if r.get("records_tag")]  # methods added later: a Holm family of their own
        main = [r for r in main if not r.get("records_tag")]
        out += _method_tables(name, main, draws, persistence=name == "ks")
        if added:
            refs = [r for r in main if r["method"] in ("frozen", "rss") and r["method"] not in _methods(added)]
            out += [f"## {name}: methods added later ({', '.join(f'`{m}`' for m in _methods(added))})", "",
                    "Named in the config before they ran: the same draws, bases, seeds, budget and protocol as the "
                    "records above, paired with the same `rss` runs; their tables are Holm families of their own, "
                    "so the marks above keep the families they were named with.", "",
                    *_method_tables(name, refs + added, draws)]  # fmt: skip
        if parts.get("ablation"):
            metric = workloads.METRICS[name][0]
            extra = parts["ablation"]
            out += [f"### Variants run apart from the pre-registered ones ({metric})", "",
                    "The same protocol and draws; not in the tables above, so their Holm families are their own.",
                    "", *error_table(extra, metric), ""]  # fmt: skip
            refs = ["rss", "rss_affine", "rss_mlp"]  # rss_mlp: the MLP-conditioned forms pair with it
            matched = any(workloads.RANK_SUFFIX.fullmatch(r["method"]) for r in extra)  # rank variants
            if matched:
                refs += ["film_layer0", "film_layer_affine0", "hypernet1_shift"]
            for ref in (m for m in refs if any(r["method"] == m for r in main + extra)):
                pairs = [r for r in main if r["method"] == ref] + extra
                out += [f"Paired ratio variant / `{ref}`:", "", *ratio_table(pairs, metric, ref), ""]
                if matched:  # "level" at matched parameters means shown equivalent within ±LEVEL
                    out += [f"Equivalence of variant and `{ref}` within ±{LEVEL:.0%} (TOST; 90 % interval; **≈**: "
                            "shown after Holm over this table):", "",
                            *equivalence_table(pairs, metric, ref, margin=LEVEL), ""]  # fmt: skip
        if parts.get("convergence"):
            metric = workloads.METRICS[name][0]
            out += [f"### Convergence check (draw 0, {metric})", "",
                    *convergence_table(main, parts["convergence"], metric), ""]  # fmt: skip
        out += ["### Cost", "", *cost_table(main + added), ""]
        plot(main + added, workloads.METRICS[name][0], workdir / f"{name}.png")
        out += [f"![{name}]({name}.png)", ""]
    path = workdir / "report.md"
    path.write_text("\n".join(out))
    return path


def main(argv: list[str] | None = None) -> None:  # pragma: no cover - command line
    workloads.command_line(run, "configs/workload_study.py", "results/workload_study", argv)


if __name__ == "__main__":  # pragma: no cover
    main()

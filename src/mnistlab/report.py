"""The experiment table, built from the runs under `logs/`: `python -m mnistlab.report [logs=DIR]`.

Each run directory holds `.hydra/config.yaml` (what ran), `metrics.json` (how it ended) and
TensorBoard events (the curves). Runs whose configs differ only in `seed` are one row, with
mean +- std over the seeds. Writes `report.md`, `report.png` (validation curves) and
`pareto.png` (accuracy against parameters, beside the released and published networks) in LOGS.
"""

from __future__ import annotations

import json
import math
import statistics
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import hydra
from omegaconf import OmegaConf

from mnistlab import PROJECT_ROOT, MnistlabError
from mnistlab.cli import launch, one_line_errors
from mnistlab.runs import RunDir, process_alive

# What the original project's README reported for each experiment (docs/original-experiments.md).
REFERENCE_RESULTS = {
    "ex01": "ep1 test 89.64%", "ex02": "ep1 test 88.19%", "ex03": "ep1 test 94.75%",
    "ex04": "ep1 test 96.11%", "ex05": "ep10 test 98.63%", "ex06": "ep10 test 98.04%",
    "ex07": "ep10 test 98.72%", "ex08": "ep19 test 99.17%", "ex09": "ep19 test 99.46%",
    "ex10": "ep19 test 99.47%", "ex11": "ep20 test 99.28%", "ex12": "ep15 val 98.86%, test 99.35%",
    "ex13": "ep15 val 98.55%, test 99.23%", "ex14": "ep20 val 98.99%, test 99.18%",
    "ex15": "ep20 val 98.93%, test 99.19%", "ex16": "ep20 val 98.90%, test 99.15%",
    "ex17": "ep14 val 99.38%, test 99.49%", "ex18": "ep19 val 99.30%, test 99.41%",
}  # fmt: skip

# Keys that name where a run wrote, how it showed progress or how fast it ran, not what it ran.
NOT_CONFIG = {"seed", "logger", "ckpt_path", "compile", "paths"}
NOT_RUN_TRAINER = (
    "trainer.default_root_dir=", "trainer.enable_progress_bar=", "trainer.enable_model_summary=",
    "trainer.enable_autolog_hparams=",
)  # fmt: skip
NOT_RECIPE = (
    "seed=", "hydra.", "data.data_dir=", "paths.", "compile=", "model.compile=", "callbacks.pictures=",
    *NOT_RUN_TRAINER,
)  # fmt: skip
CONF = PROJECT_ROOT / "conf"


def recording_callbacks() -> set[str]:
    """The callbacks every run has (conf/callbacks/default.yaml): they record a run; a callback
    added to them (EMA) is part of the recipe. Runs from before callbacks had one file each
    named their checkpoint callback `model_checkpoint`."""
    listed = OmegaConf.load(CONF / "callbacks" / "default.yaml").get("defaults", [])
    return {str(name) for name in listed if name != "_self_"} | {"model_checkpoint"}


def _short(override: str) -> str:
    """`optimizer.lr=0.027583475549166746` -> `optimizer.lr=0.02758`: sampled values, readable."""
    key, _, value = override.partition("=")
    try:
        return f"{key}={float(value):.4g}" if "." in value or "e" in value else override
    except ValueError:
        return override


@dataclass
class Run:
    path: Path
    config: dict
    overrides: list[str]
    metrics: dict

    @property
    def status(self) -> str | None:
        """The recorded status; `lost` for a `running` run whose process is gone (`kill -9`)."""
        status = self.metrics.get("status")
        return "lost" if status == "running" and process_alive(self.metrics) is False else status

    @property
    def recipe_overrides(self) -> list[str]:
        """The overrides that make this configuration, without seed and paths, values shortened."""
        return [_short(o) for o in self.overrides if not o.lstrip("+~").startswith(NOT_RECIPE)]

    @property
    def label(self) -> str:
        return " ".join(self.recipe_overrides) or "default"

    @property
    def key(self) -> str:
        config = {k: v for k, v in self.config.items() if k not in NOT_CONFIG}
        trainer = config.get("trainer", {}).items()
        config["trainer"] = {k: v for k, v in trainer if f"trainer.{k}=" not in NOT_RUN_TRAINER}
        config["model"] = {k: v for k, v in config.get("model", {}).items() if k != "compile"}
        callbacks = (config.get("callbacks") or {}).items()
        recording = recording_callbacks()
        config["callbacks"] = {k: v for k, v in callbacks if v and k not in recording}
        config.setdefault("label_smoothing", 0.0)  # runs from before the key existed had none
        # the precision the run trained in (trainer.precision=auto resolved; unset was fp32)
        precision = self.metrics.get("precision") or config["trainer"].get("precision")
        config["trainer"]["precision"] = "32-true" if precision in (None, 32, "32") else str(precision)
        # a teacher is part of the recipe, by its files' contents (distill=none and runs from
        # before distillation have none)
        if config.get("distill") or self.metrics.get("teacher"):
            files = (self.metrics.get("teacher") or {}).get("files", [])
            config["distill"] = {**(config.get("distill") or {}), "teachers": [f["sha256"] for f in files]}
        else:
            config.pop("distill", None)
        return json.dumps(config, sort_keys=True, default=str)


class Runs(list):
    """The runs found under a folder, and why the run directories that could not be read were not."""

    def __init__(self, runs=(), unreadable=()):
        super().__init__(runs)
        self.unreadable = list(unreadable)


def find_runs(logs: Path) -> Runs:
    """Every run under `logs` that has a config and a metrics.json, oldest first; a run directory
    whose records cannot be read is left out and named in `unreadable`, with why."""
    if not logs.is_dir():
        raise MnistlabError(f"{logs} is not a folder; pass logs=<the folder that holds the runs>")
    runs = Runs()
    for metrics_file in sorted(logs.rglob("metrics.json")):
        run_dir = RunDir(metrics_file.parent)
        if not run_dir.config_file.is_file():
            continue
        try:
            run = Run(run_dir.path, run_dir.read_config(), run_dir.read_overrides(), run_dir.read_metrics())
        except MnistlabError as e:
            runs.unreadable.append(str(e))
            continue
        runs.append(run)
    runs.sort(key=lambda r: r.metrics.get("started") or "")  # stable: path order within
    return runs


def val_curve(run: Run) -> list[float]:
    """Per-epoch `val/acc` from the run's TensorBoard events."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events_dir = run.path / "tensorboard"
    if not events_dir.is_dir():
        return []
    events = EventAccumulator(str(events_dir), size_guidance={"scalars": 0})
    events.Reload()
    if "val/acc" not in events.Tags()["scalars"]:
        return []
    return [e.value for e in events.Scalars("val/acc")]


def _spread(values: list[float], scale: float = 100, digits: int = 2) -> str:
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0] * scale:.{digits}f}"
    mean, std = statistics.mean(values), statistics.stdev(values)
    return f"{mean * scale:.{digits}f} ± {std * scale:.{digits}f} (min {min(values) * scale:.{digits}f})"


def _describe(config: dict) -> dict[str, str]:
    optimizer = config.get("optimizer", {})
    scheduler = config.get("scheduler") or {}
    sched_name = scheduler.get("_target_", "none").rsplit(".", 1)[-1]
    if sched_name == "StepLR":
        sched_name += f" {scheduler.get('step_size')}×{scheduler.get('gamma')}"
    model, data = config.get("model", {}), config.get("data", {})
    # a layer list uses model.dropout only where it has a `dropout` line; any other network, if it takes one
    has_dropout = "dropout" in model and (
        "layers" not in model or any(str(line).split()[0] == "dropout" for line in model["layers"])
    )
    return {
        "batch": str(data.get("batch_size", "")),
        "optimizer": f"{optimizer.get('_target_', '?').rsplit('.', 1)[-1]} {optimizer.get('lr'):.4g}",
        "scheduler": sched_name,
        "dropout": f"{model.get('dropout'):.4g}" if has_dropout else "–",
        "augment": str(data.get("augment", "")),
        "split": f"{data.get('train_size', 0) / 1000:g}k/{data.get('val_size', 0) / 1000:g}k",
    }


def by_seed(runs: list[Run]) -> dict[str, dict[int, Run]]:
    """Runs grouped by configuration (`Run.key`), each group one run per seed: a repeated seed
    is its latest run. The one grouping behind the report's rows and a release's seeds."""
    groups: dict[str, dict] = {}
    for run in sorted(runs, key=lambda r: r.metrics.get("started") or ""):  # oldest first
        groups.setdefault(run.key, {})[run.metrics.get("seed", run.config.get("seed"))] = run
    return groups


def recipes(runs: list[Run]) -> list[list[Run]]:
    """Finished runs grouped by configuration, one run per seed (a repeated seed: its latest run)."""
    return [list(seeds.values()) for seeds in by_seed([r for r in runs if r.status == "ok"]).values()]


def name_of(group: list[Run]) -> tuple[Run, str | None]:
    """The run that names a group (started with the fewest overrides: a preset's own command where
    there is one) and its `experiment=` preset, if any."""
    first = min(group, key=lambda r: ("experiment=" not in r.label, len(r.label)))
    experiment = next((o.split("=", 1)[1] for o in first.overrides if o.startswith("experiment=")), None)
    return first, experiment


def build_report(runs: list[Run]) -> str:
    header = (
        "| configuration | params | batch | optimizer, LR | scheduler | dropout | augment | split | epochs "
        "| best val/acc % | test/acc % | stress/acc % | train min | n | original README |"
    )
    lines = [
        "# Experiment report",
        "",
        "Built by `make report` from the runs under logs/. Accuracy in %; with several seeds of one "
        "configuration (n = distinct seeds; a repeated seed counts once, its latest run): "
        "mean ± sample std (min). test/acc is measured on the checkpoint with the best val/acc "
        "(the last one when there is no validation set); stress/acc on the same checkpoint, on the "
        "stress test set (the official test digits distorted, src/mnistlab/stress.py).",
        "",
        header,
        "|" + "---|" * (header.count("|") - 1),
    ]
    for group in recipes(runs):
        first, experiment = name_of(group)
        d = _describe(first.config)
        minutes = [r.metrics.get("train_seconds", 0) / 60 for r in group]
        val = [r.metrics["val/acc_best"] for r in group if r.metrics.get("val/acc_best") is not None]
        test = [r.metrics["test/acc"] for r in group]
        stressed = [r.metrics["stress/acc"] for r in group if r.metrics.get("stress/acc") is not None]
        cells = [
            f"`{first.label}`", f"{first.metrics.get('params', 0):,}", d["batch"], d["optimizer"],
            d["scheduler"], d["dropout"], d["augment"], d["split"], str(first.metrics.get("epochs")),
            _spread(val), _spread(test), _spread(stressed), f"{statistics.mean(minutes):.1f}",
            str(len(group)),
            REFERENCE_RESULTS.get(experiment, ""),
        ]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    failed = [r for r in runs if r.status != "ok"]
    if failed:
        lines += ["", "## Runs that did not finish", ""]
        for r in failed:
            why = {
                "running": f"running (pid {r.metrics.get('pid')} on {r.metrics.get('host')})",
                "lost": f"lost: its process (pid {r.metrics.get('pid')} on {r.metrics.get('host')}) is gone "
                "without a final state (killed); resume with ckpt_path=last",
            }.get(r.status, r.metrics.get("error", r.status))
            lines.append(f"- `{r.path}` (`{r.label}`): {why}")
    return "\n".join(lines) + "\n"


def plot_curves(runs: list[Run], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5.5))
    colors: dict[str, str] = {}
    for run in runs:
        curve = val_curve(run)
        if len(curve) < 2:  # a one-epoch run is a point, not a curve
            continue
        label = run.label if run.label not in colors else None
        color = colors.setdefault(run.label, f"C{len(colors) % 10}")
        ax.plot(range(1, len(curve) + 1), [100 * v for v in curve], color=color, label=label, alpha=0.8)
    ax.set(xlabel="epoch", ylabel="val/acc (%)", title="Validation accuracy per run")
    ax.set_ylim(max(ax.get_ylim()[0], 97.0), 100.0)
    ax.grid(alpha=0.3)
    if colors:
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def released_points(weights: Path) -> list[tuple[str, int, float, float, int]]:
    """One point per released network (`weights/*.json`, `make release`): its seeds' test/acc
    mean ± std; a JSON file that is not such a record is named on stderr and skipped."""
    weights = Path(weights)
    if not weights.is_dir():
        raise MnistlabError(f"weights={weights} is not a folder; pass the released weights' folder or null")
    points = []
    for path in sorted(weights.glob("*.json")):
        try:
            record = json.loads(path.read_text())
            seeds = record["all_seeds"]
            mean, std = 100 * float(seeds["test/acc mean"]), 100 * float(seeds.get("test/acc std") or 0.0)
            points.append((f"released {path.stem}", int(record["params"]), mean, std, int(seeds["n"])))
        except (OSError, ValueError, TypeError, KeyError, AttributeError):
            print(f"skipped: {path} is not a release record (make release writes them)", file=sys.stderr)
    return points


def published_points(published: list[dict]) -> list[tuple[str, int, float, float, int]]:
    """The `published:` results of conf/report.yaml as points (one run each)."""
    points = []
    for ref in published:
        try:
            points.append((f"{ref['label']}: {ref['how']}", int(ref["params"]), float(ref["acc"]), 0.0, 1))
        except (KeyError, TypeError, ValueError):
            raise MnistlabError(
                f"published entry {ref!r} is not a result; give each one label, params, acc (test %) "
                "and how, as conf/report.yaml does"
            ) from None
    return points


def label_column(ax, labels: list[tuple[str, float, float]], fontsize: float = 7) -> list:
    """Names the points in a column right of the axes, in the order of their heights, each joined
    to its point by a thin line: close points keep names that never overlap, however long."""
    to_axes = ax.transData + ax.transAxes.inverted()
    gap = fontsize * 1.45 / 72 * ax.figure.dpi / ax.get_window_extent().height  # a line, in axes heights
    order = sorted(range(len(labels)), key=lambda i: -to_axes.transform(labels[i][1:])[1])
    heights, below = {}, float("inf")
    for i in order:
        below = heights[i] = min(to_axes.transform(labels[i][1:])[1], below - gap)
    lift = max(0.0, -below)  # a column running past the bottom moves up as a whole
    line = {"arrowstyle": "-", "color": "0.65", "lw": 0.5, "shrinkA": 1, "shrinkB": 3}
    return [
        ax.annotate(text, (x, y), xytext=(1.02, heights[i] + lift), textcoords="axes fraction", va="center",
                    fontsize=fontsize, arrowprops=line, annotation_clip=False)
        for i, (text, x, y) in enumerate(labels)
    ]  # fmt: skip


def plot_name(group: list[Run]) -> str:
    """A recipe's name on a plot, short: its preset, then each setting by its last key
    (`temperature=2`, not `distill.temperature=2`; report.md has them whole), a teacher
    checkpoint by its run's folder."""

    def teacher(path: str) -> str:
        path = Path(path.strip())
        return path.parent.parent.name if path.parent.name == "checkpoints" else path.stem

    first, experiment = name_of(group)
    words = [experiment] if experiment else []
    for override in first.recipe_overrides:
        key, _, value = override.partition("=")
        key = key.lstrip("+~")
        if key == "experiment":
            continue
        if key == "distill.teachers" and value.startswith("["):
            value = ",".join(teacher(p) for p in value.strip("[]").split(","))
        words.append(f"{key.rsplit('.', 1)[-1]}={value}")
    return " ".join(words) or "default"


def plot_pareto(
    runs: list[Run], path: Path, released: list[tuple] = (), published: list[tuple] = ()
) -> list[tuple[str, int, float, float, int]]:
    """Test accuracy (mean ± std over seeds) against parameter count: one point per recipe
    (distilled recipes in their own colour, single runs hollow), the released networks, and
    published results as crosses; returns the points as (label, params, mean %, std %, seeds).
    A recipe whose runs did not record their parameter count cannot be placed and is left out."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = {
        "recipe": ("o", "C0", "recipe, mean ± std over seeds"),
        "distilled": ("o", "C1", "distilled recipe, mean ± std over seeds"),
        "released": ("s", "C2", "released weights, over their seeds"),
        "published": ("x", "k", "published, one run"),
    }
    drawn = []  # (label, params, mean %, std %, n, kind)
    for group in recipes(runs):
        tests = [100 * r.metrics["test/acc"] for r in group]
        std = statistics.stdev(tests) if len(tests) > 1 else 0.0
        kind = "distilled" if group[0].metrics.get("teacher") else "recipe"
        params = group[0].metrics.get("params") or 0
        drawn.append((plot_name(group), params, statistics.mean(tests), std, len(tests), kind))
    drawn += [(*point, "released") for point in released] + [(*point, "published") for point in published]
    drawn = [d for d in drawn if d[1] > 0 and math.isfinite(d[2] + d[3])]  # those that can be placed

    # a column of names, one line each, beside an axes as tall as the column needs
    fig, ax = plt.subplots(figsize=(13, max(6.0, 0.17 * len(drawn) + 1.5)))
    fig.subplots_adjust(left=0.06, right=0.42, bottom=0.1, top=0.93)
    # points of one parameter count stand side by side (2% apart), not on top of each other
    count, placed, x = Counter(d[1] for d in drawn), Counter(), []
    for d in drawn:
        x.append(d[1] * 1.02 ** (placed[d[1]] - (count[d[1]] - 1) / 2))
        placed[d[1]] += 1
    for i, (_, _, mean, std, n, kind) in enumerate(drawn):
        marker, color, _ = kinds[kind]
        face = color if n > 1 or kind == "published" else "none"  # a single run: a hollow marker
        ax.errorbar(x[i], mean, yerr=std, fmt=marker, capsize=3, color=color, markerfacecolor=face)
    ax.set_xscale("log")
    if drawn:
        ax.set_xlim(min(d[1] for d in drawn) / 1.5, max(d[1] for d in drawn) * 1.5)
    handles = [
        plt.Line2D([], [], marker=marker, color=color, linestyle="none", label=name)
        for kind, (marker, color, name) in kinds.items()
        if any(d[5] == kind for d in drawn)
    ]
    if any(d[4] == 1 and d[5] in ("recipe", "distilled") for d in drawn):
        handles.append(plt.Line2D([], [], marker="o", color="C0", markerfacecolor="none", linestyle="none",
                                  label="one run"))  # fmt: skip
    if handles:
        ax.legend(handles=handles, fontsize=7, loc="best")
    ax.set(xlabel="parameters (log scale)", ylabel="test/acc % (mean ± std over seeds)",
           title="Accuracy per parameter")  # fmt: skip
    ax.grid(alpha=0.3, which="both")
    label_column(ax, [(label if kind == "published" else f"{label} (n={n})", x[i], mean)
                      for i, (label, _, mean, _, n, kind) in enumerate(drawn)])  # fmt: skip
    fig.savefig(path, dpi=110, bbox_inches="tight")  # the names may reach past the figure's edge
    plt.close(fig)
    return [d[:5] for d in drawn]


def report(logs: str | Path, weights: str | Path | None = None, published: list[dict] = ()) -> list[Run]:
    """`report.md`, `report.png` and `pareto.png` in `logs` from every run under it (its
    `debug/` folder left out: checks, not results), the pareto plot also showing the networks
    released in `weights` and the `published` results; a run whose records cannot be read is
    named and skipped. Returns the runs it read."""
    logs = Path(logs)
    found = find_runs(logs)
    released = released_points(weights) if weights else []
    published = published_points(published)  # both checked before anything is written
    for why in found.unreadable:
        print(f"skipped: {why}", file=sys.stderr)
    runs = [r for r in found if r.path.relative_to(logs).parts[0] != "debug"]
    (logs / "report.md").write_text(build_report(runs))
    plot_curves(runs, logs / "report.png")
    plot_pareto(runs, logs / "pareto.png", released, published)
    print(f"{len(runs)} runs -> {logs / 'report.md'}, {logs / 'report.png'}, {logs / 'pareto.png'}")
    return runs


@hydra.main(version_base="1.3", config_path=str(PROJECT_ROOT / "conf"), config_name="report")
@one_line_errors
def main(cfg) -> None:
    report(cfg.logs, cfg.weights, OmegaConf.to_container(cfg.published) if cfg.published else [])


if __name__ == "__main__":
    launch(main)

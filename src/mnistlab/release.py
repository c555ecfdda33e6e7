"""`make release RUNS=logs/multiruns/<sweep>`: the released weights, from one seed of a recipe.

`python -m mnistlab.release runs=[<folder>,...] [partial=true] [overwrite=true] [out=DIR] [name=NAME]`

The runs under `runs` (one folder or several: a sweep run in parts) must be one complete,
healthy seed sweep of one configuration (`train.py -m seed=1,2,3,4,5 experiment=best`): every
run `ok`, trained its full `trainer.max_epochs`, no `debug=`/`limit_*_batches` shortening.
Anything else is refused, naming the runs and why; `partial=true` releases from the healthy
seeds of an incomplete sweep and records which seeds are missing. The released seed is the one
whose best `val/acc` is the median of them: representative of the recipe, and chosen without
looking at the test set.

Writes `weights/<name>.pt` (the network's state_dict), `weights/<name>.onnx` (checked in
onnxruntime against PyTorch) and `weights/<name>.json` (command, commit, seed, why, the metrics,
and the SHA-256 of the two other files) as one unit: all three are written to a staging folder
first and renamed into place after a marker says the set is complete, so a release killed at
any point leaves the previous three files or the new three (a later release or reader finishes
the renames a kill interrupted). Weights with a lower test accuracy than the released ones
replace them only with `overwrite=true`.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import statistics
from pathlib import Path

import hydra
import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf

from mnistlab import PROJECT_ROOT, MnistlabError
from mnistlab.cli import launch, one_line_errors
from mnistlab.data import MEAN, STD, standardize, to_unit
from mnistlab.export import export_onnx, official_test_set
from mnistlab.files import write_atomic, write_json
from mnistlab.module import load_classifier
from mnistlab.report import Run, by_seed, find_runs
from mnistlab.train import stress_test

SHORTENING = (
    "limit_train_batches",
    "limit_val_batches",
    "limit_test_batches",
    "fast_dev_run",
    "overfit_batches",
)


def model_name(layers: list) -> str | None:
    """The conf/model/*.yaml whose layers these are: the released files are named after it."""
    for path in sorted((PROJECT_ROOT / "conf" / "model").glob("*.yaml")):
        if list(OmegaConf.load(path).get("layers", [])) == list(layers):
            return path.stem
    return None


def median_run(runs: list[Run]) -> Run:
    """The run with the median best `val/acc` (the lower of the two middle ones for an even count);
    a tie goes to the smaller seed. Runs without a validation set (trained on all 60k) give the
    smallest seed: fixed before any result, and never chosen by the test set."""
    if any(r.metrics.get("val/acc_best") is None for r in runs):  # trained on all 60k: nothing to rank by
        return min(runs, key=lambda r: r.metrics["seed"])
    ranked = sorted(runs, key=lambda r: (r.metrics["val/acc_best"], r.metrics["seed"]))
    return ranked[(len(ranked) - 1) // 2]


def shortened(run: Run) -> str | None:
    """Why a run is a check rather than a result (`debug=`, a `limit_*_batches`), or None."""
    debug = [o for o in run.overrides if o.lstrip("+").startswith("debug=")]
    if debug:
        return debug[0]
    trainer = run.config.get("trainer") or {}
    for key in SHORTENING:
        value = trainer.get(key)
        if key.startswith("limit_"):  # None or 1.0: every batch; an int is a count, a float a fraction
            short = value is not None and not (isinstance(value, float) and value == 1.0)
        else:  # fast_dev_run, overfit_batches: off when false or 0
            short = bool(value)
        if short:
            return f"trainer.{key}={value}"
    return None


def unhealthy(run: Run) -> str | None:
    """Why a run does not stand for its seed: not `ok`, or stopped before `trainer.max_epochs`."""
    if run.status != "ok":
        return run.status or "no status"
    max_epochs = (run.config.get("trainer") or {}).get("max_epochs")
    if isinstance(max_epochs, int) and run.metrics.get("epochs") != max_epochs:
        return f"{run.metrics.get('epochs')} of {max_epochs} epochs"
    return None


def declared_seeds(runs_dir: Path) -> set[int]:
    """The seeds a multirun was started with (`seed=1,2,3` or `seed=range(1,4)` in its
    multirun.yaml), so a seed whose job never started is missing too."""
    sweep = runs_dir / "multirun.yaml"
    if not sweep.is_file():
        return set()
    for override in OmegaConf.load(sweep).hydra.overrides.task:
        key, _, value = str(override).partition("=")
        if key == "seed":
            if value.startswith("range(") and value.endswith(")"):
                return set(range(*(int(v) for v in value[6:-1].split(","))))
            try:
                return {int(v) for v in value.split(",")}
            except ValueError:
                return set()
    return set()


def seeds_of_one_recipe(runs_dirs: list[Path], partial: bool = False) -> tuple[list[Run], list[int]]:
    """The latest run of each seed under `runs_dirs`, all healthy, full length and one recipe, and
    the seeds missing from the sweep (only with `partial`). Anything else: one line naming the
    runs and why."""
    where = " ".join(map(str, runs_dirs))
    found = [r for d in runs_dirs for r in find_runs(d)]
    if not found:
        raise MnistlabError(f"no runs under {where}; pass runs=[<the multirun of the seeds>]")
    groups = by_seed(found)
    if len(groups) > 1:
        labels = sorted({f"`{r.label}`" for r in found})
        raise MnistlabError(
            f"the runs under {where} are {len(groups)} configurations ({', '.join(labels)}); "
            "pass runs=[<one recipe's seeds>]"
        )
    (seeds,) = groups.values()
    checks = [f"{r.path} ({why})" for r in seeds.values() if (why := shortened(r))]
    if checks:
        raise MnistlabError(
            f"not a release: {len(checks)} run(s) are shortened checks, not full runs: {'; '.join(checks)}; "
            "release a sweep run without debug= or trainer.limit_*_batches"
        )
    bad = {seed: (r, why) for seed, r in seeds.items() if (why := unhealthy(r))}
    healthy = [r for seed, r in seeds.items() if seed not in bad]
    missing = sorted(
        set(bad) | set().union(*map(declared_seeds, runs_dirs)) - {r.metrics["seed"] for r in healthy}
    )
    if bad and not partial:
        named = "; ".join(f"{r.path} (seed {seed}: {why})" for seed, (r, why) in sorted(bad.items()))
        raise MnistlabError(
            f"the sweep is incomplete: {named}; resume or rerun those seeds, or pass partial=true "
            "to release from the healthy ones"
        )
    if missing and not partial:
        raise MnistlabError(
            f"the sweep is incomplete: seeds {missing} have no run under {where}; run them, or pass "
            "partial=true to release from the seeds there are"
        )
    if not healthy:
        raise MnistlabError(f"no healthy run under {where}; every seed is missing or unfinished")
    return sorted(healthy, key=lambda r: r.metrics["seed"]), missing


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _marker(out_dir: Path, name: str) -> Path:
    return out_dir / f".{name}.release"


def complete_interrupted(out_dir: Path, name: str) -> None:
    """Finishes the renames of a release killed after its staged set was complete (its marker
    exists), or removes a staged set that never was; a no-op when no release was interrupted."""
    out_dir = Path(out_dir)
    marker = _marker(out_dir, name)
    try:
        if marker.is_file():
            staging = out_dir / json.loads(marker.read_text())["staging"]
            for suffix in (".pt", ".onnx", ".json"):  # the JSON last: it describes the two before it
                if (staging / f"{name}{suffix}").is_file():
                    os.replace(staging / f"{name}{suffix}", out_dir / f"{name}{suffix}")
            marker.unlink()
        for staging in out_dir.glob(f".release-{name}-*"):
            shutil.rmtree(staging, ignore_errors=True)
    except OSError:  # a reader without write access: the release's next run finishes it
        pass


def released_test_acc(out_dir: Path, name: str) -> float | None:
    info = out_dir / f"{name}.json"
    try:
        return json.loads(info.read_text())["metrics"]["test/acc"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def release(
    runs_dirs: list[Path],
    out_dir: Path,
    name: str | None = None,
    partial: bool = False,
    overwrite: bool = False,
) -> dict:
    runs, missing = seeds_of_one_recipe(runs_dirs, partial)
    chosen = median_run(runs)
    if name is None:
        name = model_name(chosen.config["model"].get("layers", []))
        if name is None:
            raise MnistlabError("the runs' network is none of conf/model/*.yaml; pass name=NAME")
    out_dir.mkdir(parents=True, exist_ok=True)
    complete_interrupted(out_dir, name)
    before = released_test_acc(out_dir, name)
    if before is not None and chosen.metrics["test/acc"] < before and not overwrite:
        raise MnistlabError(
            f"{out_dir / name}.json holds weights with test/acc {before:.4f}, above this release's "
            f"{chosen.metrics['test/acc']:.4f} (seed {chosen.metrics['seed']}); "
            "pass overwrite=true to replace them"
        )
    classifier = load_classifier(chosen.path / chosen.metrics["checkpoint"])
    net = classifier.net.eval()
    # the run's data settings as they resolve here (data_dir is ${paths.data} in a run's config)
    data_cfg = OmegaConf.create(OmegaConf.to_container(OmegaConf.create(chosen.config).data, resolve=True))
    test = official_test_set(data_cfg)  # fetched if missing: before any file is written
    quiet = L.Trainer(
        accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False,
    )  # fmt: skip
    stressed_here = stress_test(quiet, classifier, data_cfg)  # measured on the released network itself

    staging = out_dir / f".release-{name}-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        buffer = io.BytesIO()
        torch.save(net.state_dict(), buffer)
        write_atomic(staging / f"{name}.pt", buffer.getvalue())
        check_images = standardize(to_unit(test.images[:256]))
        worst = export_onnx(net, staging / f"{name}.onnx", check_images=check_images)
        info = describe(runs, chosen, missing, stressed_here, worst)
        info["files"] = {f"{name}{s}": sha256(staging / f"{name}{s}") for s in (".pt", ".onnx")}
        write_json(staging / f"{name}.json", info)
        write_json(_marker(out_dir, name), {"staging": staging.name})  # the set is complete
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    complete_interrupted(out_dir, name)
    return {**info, "name": name}


def describe(runs: list[Run], chosen: Run, missing: list[int], stressed: dict, worst: float) -> dict:
    """weights/<name>.json: how the weights were made and what they measured."""
    seeds = sorted(r.metrics["seed"] for r in runs)
    tests = [r.metrics["test/acc"] for r in runs]
    stress_by_seed = [r.metrics.get("stress/acc") for r in runs]
    overrides = [o for o in chosen.overrides if not o.startswith("hydra.")]
    return {
        "command": "python train.py " + " ".join(overrides),
        "commit": chosen.metrics.get("commit"),
        "seed": chosen.metrics["seed"],
        "why_this_seed": (
            f"median best val/acc of the {len(runs)} seeds {seeds}: "
            "representative of the recipe, chosen without the test set (not the best test run)"
            if chosen.metrics.get("val/acc_best") is not None
            else f"the smallest of the seeds {seeds}, trained on all 60k "
            "images (no validation set to rank by): fixed in advance, not chosen by any result"
        ),
        "missing_seeds": missing,  # released with partial=true from an incomplete sweep
        "run_dir": str(chosen.path),
        "metrics": {
            **{k: chosen.metrics.get(k) for k in ("test/acc", "test/loss", "val/acc_best", "epochs")},
            **stressed,
        },
        "all_seeds": {
            "n": len(runs),
            "test/acc mean": statistics.mean(tests),
            "test/acc std": statistics.stdev(tests) if len(tests) > 1 else 0.0,
            "test/acc min": min(tests),
            "test/acc by seed": {r.metrics["seed"]: r.metrics["test/acc"] for r in runs},
            "stress/acc by seed": {r.metrics["seed"]: r.metrics.get("stress/acc") for r in runs},
            "stress/acc mean": statistics.mean(s for s in stress_by_seed if s is not None)
            if any(s is not None for s in stress_by_seed)
            else None,
        },
        "params": chosen.metrics.get("params"),
        "model": chosen.config["model"].get("layers"),
        "input": f"[N, 1, 28, 28] float, (pixel / 255 - {MEAN}) / {STD}",
        "output": "[N, 10] logits",
        "onnx_max_abs_diff": worst,
    }


@hydra.main(version_base="1.3", config_path=str(PROJECT_ROOT / "conf"), config_name="release")
@one_line_errors
def main(cfg: DictConfig) -> None:
    runs = [cfg.runs] if isinstance(cfg.runs, str) else list(cfg.runs)
    if not runs:
        raise MnistlabError("runs= is empty; pass runs=[<the multirun of the seeds>]")
    out = Path(cfg.out)
    info = release([Path(r) for r in runs], out, cfg.name, partial=cfg.partial, overwrite=cfg.overwrite)
    missing = f"; seeds {info['missing_seeds']} missing (partial=true)" if info["missing_seeds"] else ""
    written = f"{out}/{info['name']}.{{pt,onnx,json}}"
    print(f"released seed {info['seed']} ({info['why_this_seed']}){missing} -> {written}")


if __name__ == "__main__":
    launch(main)

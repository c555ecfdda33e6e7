"""`make release RUNS=logs/multiruns/<sweep>`: the released weights, from one seed of a recipe.

The runs under RUNS (one folder or several: a sweep run in parts) must be one configuration over
several seeds (`train.py -m seed=1,2,3,4,5 experiment=best`). The released seed is the one
whose best `val/acc` is the median of them: representative of the recipe, and chosen without
looking at the test set. Writes
`weights/<name>.pt` (the network's state_dict), `weights/<name>.onnx` (checked in onnxruntime
against PyTorch) and `weights/<name>.json` (command, commit, seed, why, and the metrics).
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
from pathlib import Path

import torch
from omegaconf import OmegaConf

from mnistlab import PROJECT_ROOT, MnistlabError
from mnistlab.cli import register
from mnistlab.data import MEAN, STD, standardize, to_unit
from mnistlab.export import export_onnx, official_test_set
from mnistlab.files import write_atomic, write_json
from mnistlab.module import load_classifier
from mnistlab.report import Run, find_runs
from mnistlab.stress import stress


def accuracy(net: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    with torch.no_grad():
        read = torch.cat([net(standardize(to_unit(batch))).argmax(1) for batch in images.split(1000)])
    return float((read == labels).float().mean())


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


def seeds_of_one_recipe(runs_dirs: list[Path]) -> list[Run]:
    where = " ".join(map(str, runs_dirs))
    runs = [r for d in runs_dirs for r in find_runs(d) if r.metrics.get("status") == "ok"]
    runs.sort(key=lambda r: r.metrics.get("started") or "")
    if not runs:
        raise MnistlabError(f"no finished runs under {where}; pass RUNS=<the multirun of the seeds>")
    if len({r.key for r in runs}) > 1:
        raise MnistlabError(
            f"the runs under {where} are more than one configuration; pass RUNS=<one recipe's seeds>"
        )
    by_seed = {r.metrics["seed"]: r for r in runs}  # a repeated seed: its latest run
    return list(by_seed.values())


def release(runs_dirs: list[Path], out_dir: Path, name: str) -> dict:
    runs = seeds_of_one_recipe(runs_dirs)
    chosen = median_run(runs)
    net = load_classifier(chosen.path / chosen.metrics["checkpoint"]).net.eval()
    # the run's data settings as they resolve here (data_dir is ${paths.data} in a run's config)
    data_cfg = OmegaConf.create(OmegaConf.to_container(OmegaConf.create(chosen.config).data, resolve=True))
    test = official_test_set(data_cfg)  # fetched if missing: before any file is written
    stress_acc = accuracy(net, stress(test.images), test.labels)

    out_dir.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    torch.save(net.state_dict(), buffer)
    write_atomic(out_dir / f"{name}.pt", buffer.getvalue())
    worst = export_onnx(net, out_dir / f"{name}.onnx", check_images=standardize(to_unit(test.images[:256])))

    tests = [r.metrics["test/acc"] for r in runs]
    stressed = [r.metrics["stress/acc"] for r in runs if r.metrics.get("stress/acc") is not None]
    overrides = [o for o in chosen.overrides if not o.startswith("hydra.")]
    info = {
        "command": "python train.py " + " ".join(overrides),
        "commit": chosen.metrics.get("commit"),
        "seed": chosen.metrics["seed"],
        "why_this_seed": (
            f"median best val/acc of the {len(runs)} seeds {sorted(r.metrics['seed'] for r in runs)}: "
            "representative of the recipe, chosen without the test set (not the best test run)"
            if chosen.metrics.get("val/acc_best") is not None
            else f"the smallest of the seeds {sorted(r.metrics['seed'] for r in runs)}, trained on all 60k "
            "images (no validation set to rank by): fixed in advance, not chosen by any result"
        ),
        "run_dir": str(chosen.path),
        "metrics": {
            **{k: chosen.metrics.get(k) for k in ("test/acc", "test/loss", "val/acc_best", "epochs")},
            # measured here on the released network itself, also for runs recorded before stress.py
            "stress/acc": stress_acc,
        },
        "all_seeds": {
            "n": len(runs),
            "test/acc mean": statistics.mean(tests),
            "test/acc std": statistics.stdev(tests) if len(tests) > 1 else 0.0,
            "test/acc min": min(tests),
            "test/acc by seed": {r.metrics["seed"]: r.metrics["test/acc"] for r in runs},
            "stress/acc by seed": {r.metrics["seed"]: r.metrics.get("stress/acc") for r in runs},
            "stress/acc mean": statistics.mean(stressed) if stressed else None,
        },
        "params": chosen.metrics.get("params"),
        "model": chosen.config["model"]["layers"],
        "input": f"[N, 1, 28, 28] float, (pixel / 255 - {MEAN}) / {STD}",
        "output": "[N, 10] logits",
        "onnx_max_abs_diff": worst,
    }
    write_json(out_dir / f"{name}.json", info)
    return info


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", type=Path, nargs="+", help="the folders of one recipe's seed runs")
    parser.add_argument("--out", type=Path, default=Path("weights"))
    parser.add_argument("--name", help="file name of the weights (default: the runs' conf/model name)")
    args = parser.parse_args(argv)
    register()  # the resolvers a run's config uses (${project_root:} ...)
    try:
        if args.name is None:
            runs = seeds_of_one_recipe(args.runs)
            args.name = model_name(runs[0].config["model"]["layers"])
            if args.name is None:
                raise MnistlabError("the runs' network is none of conf/model/*.yaml; pass --name NAME")
        info = release(args.runs, args.out, args.name)
    except MnistlabError as e:
        sys.exit(f"error: {e}")
    written = f"{args.out}/{args.name}.{{pt,onnx,json}}"
    print(f"released seed {info['seed']} ({info['why_this_seed']}) -> {written}")


if __name__ == "__main__":
    main()

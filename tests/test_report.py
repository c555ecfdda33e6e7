"""The report groups runs that differ only by seed, and shows mean, spread, min and n."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mnistlab import MnistlabError
from mnistlab.report import (
    Run,
    build_report,
    find_runs,
    label_column,
    plot_name,
    plot_pareto,
    published_points,
    released_points,
    report,
)
from mnistlab.runs import HOST


def run(seed: int, test_acc: float, val_acc: float, lr: float = 0.05, ema: bool = False) -> Run:
    config = {
        "seed": seed,
        "data": {"batch_size": 1024, "augment": "rotate_shift", "train_size": 50000, "val_size": 10000},
        "model": {"layers": ["conv 1 8", "gap", "dropout", "linear 8 10"], "dropout": 0.1},
        "optimizer": {"_target_": "torch.optim.Adam", "lr": lr},
        "scheduler": {"_target_": "torch.optim.lr_scheduler.StepLR", "step_size": 10, "gamma": 0.1},
        "trainer": {"max_epochs": 15, "default_root_dir": f"logs/runs/{seed}"},
        "callbacks": {"best_checkpoint": {"dirpath": f"logs/runs/{seed}/checkpoints"}},
    }
    if ema:
        config["callbacks"]["ema"] = {"_target_": "mnistlab.callbacks.EMA", "decay": 0.98}
    metrics = {"status": "ok", "test/acc": test_acc, "val/acc_best": val_acc, "epochs": 15,
               "params": 19348, "train_seconds": 600}  # fmt: skip
    return Run(Path(f"logs/runs/{seed}"), config, [f"seed={seed}", "experiment=ex17"], metrics)


def test_seeds_of_one_configuration_are_one_row_with_mean_std_min_and_n():
    """A seed run twice counts once, with its latest result."""
    runs = [
        run(1, 0.9950, 0.9930),
        run(2, 0.9940, 0.9920),
        run(3, 0.9960, 0.9940),
        run(1, 0.99, 0.99, lr=0.01),
        run(1, 0.99, 0.99, ema=True),  # averaging the weights is part of the recipe
    ]
    rows = [line for line in build_report(runs).splitlines() if line.startswith("| `")]
    assert len(rows) == 3
    cells = [c.strip() for c in rows[0].split("|")]
    assert "99.50 ± 0.10 (min 99.40)" in cells  # test/acc over the three seeds
    assert "99.30 ± 0.10 (min 99.20)" in cells
    assert cells[-3] == "3" and "ep14 val 99.38%, test 99.49%" in cells[-2]


def test_failed_runs_are_listed_apart():
    broken = run(4, 0, 0)
    broken.metrics = {"status": "failed", "error": "training diverged in epoch 0"}
    report = build_report([run(1, 0.995, 0.993), broken])
    assert "## Runs that did not finish" in report and "training diverged in epoch 0" in report


def write_run(root: Path, name: str, started: str, test_acc: float) -> None:
    import json

    from omegaconf import OmegaConf

    one = run(1, test_acc, 0.99)
    (root / name / ".hydra").mkdir(parents=True)
    OmegaConf.save(one.config, root / name / ".hydra" / "config.yaml")
    OmegaConf.save(one.overrides, root / name / ".hydra" / "overrides.yaml")
    (root / name / "metrics.json").write_text(json.dumps({**one.metrics, "started": started}))


def test_a_repeated_seed_keeps_the_run_that_started_last_not_the_last_path(tmp_path):
    write_run(tmp_path, "b", "2026-11-26T09:29:00+00:00", 0.9900)  # later in path order, earlier in time
    write_run(tmp_path, "a", "2026-11-26T09:31:00+00:00", 0.9950)
    row = next(line for line in build_report(find_runs(tmp_path)).splitlines() if line.startswith("| `"))
    assert "| 99.50 | – | 10.0 | 1 |" in row  # test/acc of the 09:31 run (no stress/acc recorded), one seed


def test_a_missing_folder_is_one_line_naming_it(tmp_path):
    with pytest.raises(MnistlabError, match=f"^{tmp_path / 'nothing'} is not a folder; pass logs="):
        report(tmp_path / "nothing")


def test_a_run_with_a_truncated_metrics_file_is_skipped_by_name_and_the_rest_reported(tmp_path, capsys):
    write_run(tmp_path, "a", "2026-11-26T09:31:00+00:00", 0.9950)
    write_run(tmp_path, "b", "2026-11-26T09:32:00+00:00", 0.9940)
    (tmp_path / "a" / "metrics.json").write_text('{"status": "ok", "test/')  # cut off mid-write
    report(tmp_path)
    (skipped,) = capsys.readouterr().err.strip().splitlines()
    assert skipped.startswith(f"skipped: {tmp_path / 'a' / 'metrics.json'} is unreadable (JSONDecodeError)")
    text = (tmp_path / "report.md").read_text()
    assert "| 99.40 |" in text and "99.50" not in text


def test_a_run_whose_process_was_killed_is_reported_lost_not_running(tmp_path):
    """A real process killed with SIGKILL: its record still says `running`, with its pid."""
    import signal
    import subprocess
    import sys

    from mnistlab.runs import process_start

    write_run(tmp_path, "a", "2026-11-26T09:31:00+00:00", 0.9950)
    victim = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    record = json.loads((tmp_path / "a" / "metrics.json").read_text())
    record |= {"status": "running", "pid": victim.pid, "pid_start": process_start(victim.pid), "host": HOST}
    (tmp_path / "a" / "metrics.json").write_text(json.dumps(record))
    (run_,) = find_runs(tmp_path)
    assert run_.status == "running"
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert run_.status == "lost"
    report = build_report([run_])
    assert f"lost: its process (pid {victim.pid} on {HOST}) is gone" in report


def test_the_pareto_plot_has_one_point_per_recipe_with_mean_std_and_params(tmp_path):
    small = [run(s, acc, 0.98) for s, acc in ((1, 0.985), (2, 0.987), (3, 0.983))]
    for r in small:
        r.metrics["params"] = 982
        r.overrides = [f"seed={r.config['seed']}", "experiment=micro"]
        r.config["model"] = {"layers": ["conv 1 4", "gap", "linear 4 10"], "dropout": 0.0}
    big = [run(1, 0.9950, 0.9930), run(2, 0.9940, 0.9920)]
    changed = run(1, 0.9900, 0.9880)  # a preset with one setting changed is its own point, named so
    changed.overrides.append("data.augment=none")
    changed.config["data"] = {**changed.config["data"], "augment": "none"}
    published = published_points([{"label": "LeNet-5", "params": 60000, "acc": 99.05, "how": "one run"}])
    released = [("released gap_cnn", 19348, 99.53, 0.066, 5), ("released broken", 5000, float("nan"), 0.0, 3)]
    unplaceable = run(1, 0.97, 0.97, lr=0.3)  # recorded no parameter count: left out, not drawn at 0
    del unplaceable.metrics["params"]
    points = plot_pareto([*small, *big, changed, unplaceable], tmp_path / "pareto.png", released, published)
    by_label = {label: (params, round(mean, 3), round(std, 3), n) for label, params, mean, std, n in points}
    assert by_label == {
        "micro": (982, 98.5, 0.2, 3),
        "ex17": (19348, 99.45, 0.071, 2),
        "ex17 augment=none": (19348, 99.0, 0.0, 1),
        "released gap_cnn": (19348, 99.53, 0.066, 5),
        "LeNet-5: one run": (60000, 99.05, 0.0, 1),
    }
    assert (tmp_path / "pareto.png").read_bytes()[:4] == b"\x89PNG"


def test_bad_published_results_or_weights_are_one_line_before_anything_is_written(tmp_path):
    with pytest.raises(MnistlabError, match=r"published entry .*LeNet-5.* give each one label, params, acc"):
        report(tmp_path, published=[{"label": "LeNet-5", "acc": 99.05}])
    with pytest.raises(MnistlabError, match="nowhere is not a folder; pass the released weights. folder"):
        report(tmp_path, weights=tmp_path / "nowhere")
    assert list(tmp_path.iterdir()) == []  # no report.md, report.png or pareto.png half written


def test_released_points_come_from_the_release_records(tmp_path, capsys):
    record = {"params": 7316, "all_seeds": {"n": 3, "test/acc mean": 0.99397, "test/acc std": 0.0006}}
    (tmp_path / "tiny_cnn.json").write_text(json.dumps(record))
    (tmp_path / "notes.json").write_text(json.dumps({"what": "not a release"}))
    (tmp_path / "list.json").write_text("[1, 2]")
    (tmp_path / "broken.json").write_text("not json")
    ((name, params, mean, std, n),) = released_points(tmp_path)
    assert (name, params, round(mean, 3), round(std, 2), n) == ("released tiny_cnn", 7316, 99.397, 0.06, 3)
    skipped = capsys.readouterr().err
    assert all(
        f"skipped: {tmp_path / f} is not a release record" in skipped
        for f in ("notes.json", "list.json", "broken.json")
    )


def test_a_plot_names_a_teacher_by_its_run_and_settings_by_their_last_key():
    student = run(1, 0.993, 0.992)
    teachers = "[logs/t1/checkpoints/best.ckpt, weights/gap_cnn.pt]"
    student.overrides = [
        "experiment=tiny",
        "data.val_size=10000",
        f"+distill.teachers={teachers}",
        "model.layers=[conv 3, relu]",
    ]
    assert plot_name([student]) == "tiny val_size=10000 teachers=t1,gap_cnn layers=[conv 3, relu]"


def test_names_of_points_close_together_do_not_overlap():
    """Eight recipes within 0.04 points of each other: their names form a column, one line each,
    every name joined to its own point."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.text import Text

    fig, ax = plt.subplots(figsize=(10, 5))
    points = [(f"recipe {i} with a long name that goes on", 7316 + i, 99.40 + 0.005 * i) for i in range(8)]
    ax.plot([p[1] for p in points], [p[2] for p in points], "o")
    ax.set_ylim(98.0, 99.6)
    fig.subplots_adjust(right=0.5)
    labels = label_column(ax, points)
    fig.canvas.draw()  # places the names
    renderer = fig.canvas.get_renderer()
    boxes = [Text.get_window_extent(label, renderer) for label in labels]
    assert not any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1 :])
    assert [label.xy for label in labels] == [(p[1], p[2]) for p in points]
    heights = [box.y0 for box in boxes]
    assert heights == sorted(heights)  # the column keeps the points' order
    plt.close(fig)


def test_runs_group_by_their_teacher_and_the_precision_they_trained_in():
    """A teacher's files (by hash) and the resolved precision are part of the recipe; a run of
    distill=none and precision=auto resolved to fp32 groups with runs from before either existed."""
    old = run(1, 0.9950, 0.9930)
    new = run(2, 0.9940, 0.9920)
    new.config |= {"distill": {}}
    new.config["trainer"] = {**new.config["trainer"], "precision": "auto"}
    new.metrics |= {"precision": "32-true"}
    bf16 = run(3, 0.9940, 0.9920)
    bf16.metrics |= {"precision": "bf16-mixed"}
    teachers = []
    for seed, digest in [(4, "aa"), (5, "aa"), (6, "bb")]:
        taught = run(seed, 0.9940, 0.9920)
        taught.config |= {"distill": {"teachers": ["weights/gap_cnn.pt"], "temperature": 4.0, "weight": 0.5}}
        taught.metrics |= {"teacher": {"files": [{"path": "weights/gap_cnn.pt", "sha256": digest}]}}
        teachers.append(taught)
    keys = [r.key for r in [old, new, bf16, *teachers]]
    assert keys[0] == keys[1] and keys[2] != keys[0]
    assert keys[3] == keys[4] and keys[5] != keys[3] and keys[3] != keys[0]


def test_a_researchers_own_network_is_a_row_with_its_name_params_and_dropout():
    """Any `_target_` network, not only a layer list: its `model=` choice names the row, and its
    dropout shows when its constructor takes one."""
    own = run(1, 0.9900, 0.9890)
    own.config["model"] = {"_target_": "extensions.small_resnet.SmallResNet", "width": 16, "dropout": 0.1}
    own.overrides = ["seed=1", "model=small_resnet"]
    own.metrics["params"] = 9690
    (row,) = [line for line in build_report([own]).splitlines() if line.startswith("| `")]
    assert row.startswith("| `model=small_resnet` | 9,690 |") and "| 0.1 |" in row

"""Taking a model into use: MNIST-style preparation of any image, predict.py, and ONNX export."""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from conftest import ROOT, compose_tiny, run_script
from mnistlab import MnistlabError, instantiate
from mnistlab.cli import one_line_errors
from mnistlab.data import (
    MNIST_FILES,
    MNIST_MD5,
    MNIST_SOURCES,
    TEST_IMAGES,
    TEST_LABELS,
    ensure_files,
    read_idx,
    standardize,
    to_unit,
)
from mnistlab.export import export, export_onnx, onnx_logits, output_path
from mnistlab.module import load_classifier
from mnistlab.predict import load_network, predict
from mnistlab.prepare import load_image, mnist_style
from mnistlab.release import median_run, model_name, release, seeds_of_one_recipe, sha256
from mnistlab.report import Run
from mnistlab.runs import RunDir
from mnistlab.train import train

GAP_CNN = OmegaConf.load(ROOT / "conf" / "model" / "gap_cnn.yaml")


@pytest.fixture(scope="module")
def tiny_checkpoint(finished_run):
    return finished_run / "checkpoints" / "last.ckpt"


def test_export_writes_onnx_next_to_the_checkpoint_matching_pytorch_for_any_batch(
    tiny_checkpoint, compose_train, tmp_path, monkeypatch, capsys
):
    checkpoint = tmp_path / "run" / "last.ckpt"
    checkpoint.parent.mkdir()
    checkpoint.write_bytes(tiny_checkpoint.read_bytes())
    released = (ROOT / "weights" / "gap_cnn.onnx").read_bytes()
    monkeypatch.chdir(tmp_path)  # ckpt_path as typed, relative to the folder the user is in
    export(compose_train("ckpt_path=run/last.ckpt", "check_images=64", config_name="export"))
    out = tmp_path / "run" / "last.onnx"
    assert capsys.readouterr().out.startswith("run/last.onnx: ONNX logits match PyTorch")  # and nothing else
    assert (ROOT / "weights" / "gap_cnn.onnx").read_bytes() == released  # weights/ only changes by release
    net = load_classifier(tiny_checkpoint).net.eval()
    for n in (1, 7):
        images = torch.randn(n, 1, 28, 28)
        with torch.no_grad():
            expected = net(images).numpy()
        np.testing.assert_allclose(onnx_logits(out, images), expected, atol=1e-4)


@pytest.mark.integration
@pytest.mark.parametrize("script", ["eval.py", "predict.py", "export.py"])
def test_a_truncated_checkpoint_is_one_line_for_eval_predict_and_export(tiny_checkpoint, tmp_path, script):
    cut = tmp_path / "cut.ckpt"
    cut.write_bytes(tiny_checkpoint.read_bytes()[: tiny_checkpoint.stat().st_size // 2])  # a copy cut off
    image = [f"image={ROOT / 'docs' / 'demo' / 'mnist-test-0000-7.png'}"] if script == "predict.py" else []
    result = run_script(script, f"ckpt_path={cut}", *image)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(f"error: {cut} is not a mnistlab checkpoint")
    assert not (tmp_path / "cut.onnx").exists()


def test_export_refuses_to_write_a_file_that_disagrees(tiny_checkpoint, tmp_path):
    net = load_classifier(tiny_checkpoint).net
    with pytest.raises(MnistlabError, match="differ from PyTorch"):
        export_onnx(net, tmp_path / "m.onnx", check_images=torch.randn(4, 1, 28, 28) * 1e6)  # overflows
    assert not list(tmp_path.iterdir()), "nothing is left behind"


def test_export_refuses_outputs_it_must_not_write_before_any_work(tiny_checkpoint, tmp_path):
    (tmp_path / "taken.onnx").write_bytes(b"someone's file")
    cases = {
        tmp_path / "taken.onnx": "already exists; pass overwrite=true to replace it",
        tmp_path: "is a directory; pass output=<a file name ending in .onnx>",
        Path("/proc/x.onnx"): "cannot write to /proc",
    }
    for output, message in cases.items():
        with pytest.raises(MnistlabError, match=re.escape(message)):
            output_path(tiny_checkpoint, str(output), overwrite=False)
    assert (
        output_path(tiny_checkpoint, str(tmp_path / "taken.onnx"), overwrite=True) == tmp_path / "taken.onnx"
    )
    assert (tmp_path / "taken.onnx").read_bytes() == b"someone's file"


@pytest.mark.integration
def test_predict_reads_a_real_digit_with_the_released_weights_from_any_folder(real_test_digits, tmp_path):
    image = tmp_path / "digit.png"
    Image.fromarray(real_test_digits[0][0].numpy()).save(image)  # the first test digit, a 7
    result = run_script(str(ROOT / "predict.py"), "image=digit.png", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    answer = json.loads(result.stdout.strip().splitlines()[-1])
    assert answer["digit"] == int(real_test_digits[1][0]) == 7
    assert max(answer["probabilities"]) > 0.9 and sum(answer["probabilities"]) == pytest.approx(1, abs=1e-3)


def test_predict_with_a_checkpoint_gives_that_networks_probabilities(
    tiny_checkpoint, real_test_digits, tmp_path
):
    image = tmp_path / "digit.png"
    Image.fromarray(real_test_digits[0][0].numpy()).save(image)
    cfg = OmegaConf.create(
        {"image": str(image), "ckpt_path": str(tiny_checkpoint), "weights": None, "model": None}
    )
    answer = predict(cfg)
    with torch.no_grad():
        expected = torch.softmax(
            load_classifier(tiny_checkpoint).net.eval()(mnist_style(load_image(image))), 1
        )[0]
    assert answer["probabilities"] == pytest.approx(expected.tolist(), abs=1e-4)
    assert answer["digit"] == int(expected.argmax())


@pytest.mark.parametrize("kind", ["missing", "not_an_image", "empty", "huge"])
def test_a_bad_image_is_one_clear_error(kind, tmp_path):
    image = tmp_path / "x.png"
    if kind == "not_an_image":
        image.write_text("hello")
    elif kind == "empty":
        image.write_bytes(b"")
    elif kind == "huge":
        Image.new("L", (10_000, 10_000)).save(image)
    expected = {
        "missing": "does not exist; pass image=PATH",
        "not_an_image": "as an image",
        "empty": "as an image",
        "huge": "is 10000x10000; scale it below",
    }[kind]
    with pytest.raises(MnistlabError, match=expected):
        load_image(image)


def test_missing_released_weights_are_one_clear_error(tmp_path):
    with pytest.raises(MnistlabError, match="no released weights at .*; pass ckpt_path="):
        load_network(None, tmp_path / "none.pt", GAP_CNN)


def test_predict_reports_a_bad_image_in_one_line(compose_train, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        one_line_errors(predict)(compose_train(f"image={tmp_path / 'x.png'}", config_name="predict"))
    assert exit_.value.code == 2
    assert (
        capsys.readouterr().err
        == f"error: image {tmp_path / 'x.png'} does not exist; pass image=PATH to a PNG or JPEG\n"
    )


def test_weights_of_another_architecture_or_not_weights_at_all_are_one_clear_error(tmp_path):
    other = instantiate(OmegaConf.load(ROOT / "conf" / "model" / "nopad_10_16.yaml"))
    torch.save(other.state_dict(), tmp_path / "other.pt")
    with pytest.raises(MnistlabError, match=r"other.pt is not a state_dict of this model .*; pass model="):
        load_network(None, tmp_path / "other.pt", GAP_CNN)
    (tmp_path / "text.pt").write_text("not weights")
    with pytest.raises(MnistlabError, match=r"text.pt is not a weights file"):
        load_network(None, tmp_path / "text.pt", GAP_CNN)


@pytest.fixture(scope="module")
def tiny_sweep(tiny_mnist, tmp_path_factory) -> Path:
    """A complete seed sweep of full-length runs on the tiny data, laid out as `train.py -m seed=1,2,3`."""
    sweep = tmp_path_factory.mktemp("sweep")
    for job, seed in enumerate([1, 2, 3]):
        run_dir = sweep / str(job)
        overrides = [f"seed={seed}", "trainer.max_epochs=1"]
        cfg = compose_tiny(tiny_mnist, run_dir, *overrides)
        RunDir(run_dir).save_config(cfg, overrides)
        train(cfg, run_dir)
    OmegaConf.save(
        {"hydra": {"overrides": {"task": ["seed=1,2,3", "trainer.max_epochs=1"]}}}, sweep / "multirun.yaml"
    )
    return sweep


def released_set_is_one_unit(weights: Path, name: str = "gap_cnn") -> dict:
    """The JSON beside the .pt and .onnx describes those very files."""
    info = json.loads((weights / f"{name}.json").read_text())
    for suffix in (".pt", ".onnx"):
        assert info["files"][f"{name}{suffix}"] == sha256(weights / f"{name}{suffix}"), suffix
    return info


def test_release_takes_the_median_validation_seed_and_writes_pt_onnx_json(tiny_sweep, tmp_path):
    weights = tmp_path / "weights"
    info = release([tiny_sweep], weights, "gap_cnn")

    runs = [json.loads((tiny_sweep / str(job) / "metrics.json").read_text()) for job in range(3)]
    median = sorted(runs, key=lambda m: (m["val/acc_best"], m["seed"]))[1]
    assert info.pop("name") == "gap_cnn"
    assert json.loads(json.dumps(info)) == released_set_is_one_unit(weights)
    assert info["seed"] == median["seed"] and info["metrics"]["test/acc"] == median["test/acc"]
    assert info["command"].startswith("python train.py") and f"seed={median['seed']}" in info["command"]
    assert info["all_seeds"]["n"] == 3 and "median" in info["why_this_seed"] and info["missing_seeds"] == []
    # the stress figure measured on the released network is the one its run recorded
    assert info["metrics"]["stress/acc"] == pytest.approx(median["stress/acc"], abs=1e-6)
    assert info["all_seeds"]["stress/acc by seed"] == {r["seed"]: r["stress/acc"] for r in runs}

    # the .pt is the chosen run's network, in the architecture predict.py builds by default
    job = next(j for j in range(3) if runs[j]["seed"] == median["seed"])
    expected = load_classifier(tiny_sweep / str(job) / median["checkpoint"]).net
    net = load_network(None, weights / "gap_cnn.pt", GAP_CNN)
    images = torch.randn(5, 1, 28, 28)
    with torch.no_grad():
        assert torch.allclose(net(images), expected.eval()(images))
    assert np.allclose(onnx_logits(weights / "gap_cnn.onnx", images), net(images).detach().numpy(), atol=1e-4)
    assert not list(weights.glob(".*"))  # no staging folder or marker left


def test_released_files_are_named_after_the_runs_network():
    for name in ("gap_cnn", "tiny_cnn", "micro_cnn"):
        assert model_name(OmegaConf.load(ROOT / "conf" / "model" / f"{name}.yaml").layers) == name
    assert model_name(["conv 1 10", "gap", "linear 10 10"]) is None


def record_run(
    run_dir: Path, seed: int, dropout: float = 0.1, status: str = "ok", debug: bool = False
) -> None:
    """A run's records (config, overrides, metrics), without training it."""
    overrides = [f"seed={seed}", f"model.dropout={dropout}", *(["debug=limit"] if debug else [])]
    trainer = {"max_epochs": 2, "limit_train_batches": 3 if debug else None}
    config = {"seed": seed, "model": {**GAP_CNN, "dropout": dropout}, "trainer": trainer}
    RunDir(run_dir).save_config(OmegaConf.create(config), overrides)
    metrics = {"status": status, "seed": seed, "epochs": 2, "val/acc_best": 0.99, "test/acc": 0.99,
               "checkpoint": "x.ckpt"}  # fmt: skip
    (run_dir / "metrics.json").write_text(json.dumps(metrics))


def test_a_seed_sweep_run_in_parts_releases_from_all_its_folders(tmp_path):
    record_run(tmp_path / "runs" / "a", seed=1)  # `train.py seed=1`, then `train.py -m seed=2,3`
    for job, seed in enumerate([2, 3]):
        record_run(tmp_path / "multirun" / str(job), seed=seed)
    runs, missing = seeds_of_one_recipe([tmp_path / "runs", tmp_path / "multirun"])
    assert sorted(r.metrics["seed"] for r in runs) == [1, 2, 3] and missing == []
    record_run(tmp_path / "other" / "0", seed=4, dropout=0.2)
    with pytest.raises(MnistlabError, match="are 2 configurations"):
        seeds_of_one_recipe([tmp_path / "runs", tmp_path / "other"])


def test_an_incomplete_sweep_is_refused_in_one_line_naming_its_runs_unless_partial(tmp_path):
    """The issue's case: two runs ok, one interrupted, one failed, one seed never started."""
    sweep = tmp_path / "sweep"
    for job, (seed, status) in enumerate([(1, "ok"), (2, "ok"), (3, "interrupted"), (4, "failed")]):
        record_run(sweep / str(job), seed=seed, status=status)
    OmegaConf.save({"hydra": {"overrides": {"task": ["seed=1,2,3,4,5"]}}}, sweep / "multirun.yaml")
    with pytest.raises(MnistlabError) as error:
        seeds_of_one_recipe([sweep])
    message = str(error.value)
    assert "\n" not in message and message.startswith("the sweep is incomplete: ")
    assert f"{sweep / '2'} (seed 3: interrupted); {sweep / '3'} (seed 4: failed)" in message
    assert "partial=true" in message
    runs, missing = seeds_of_one_recipe([sweep], partial=True)
    assert [r.metrics["seed"] for r in runs] == [1, 2] and missing == [3, 4, 5]


def test_a_debug_sweep_is_never_released_not_even_partial(tmp_path):
    for job, seed in enumerate([1, 2, 3]):
        record_run(tmp_path / "sweep" / str(job), seed=seed, debug=True)
    for partial in (False, True):
        with pytest.raises(
            MnistlabError, match=r"not a release: 3 run\(s\) are shortened checks.*\(debug=limit\)"
        ):
            seeds_of_one_recipe([tmp_path / "sweep"], partial=partial)


@pytest.mark.integration
def test_release_refuses_runs_of_more_than_one_recipe_from_the_command_line(tmp_path):
    for job, dropout in enumerate([0.1, 0.2]):  # two finished runs' records, differing in dropout
        record_run(tmp_path / "sweep" / str(job), seed=1, dropout=dropout)
    result = run_script("-m", "mnistlab.release", f"runs=[{tmp_path / 'sweep'}]", f"out={tmp_path / 'w'}")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(f"error: the runs under {tmp_path / 'sweep'} are 2 configurations")
    assert not (tmp_path / "w").exists()


def test_weights_worse_than_the_released_ones_replace_them_only_with_overwrite(tiny_sweep, tmp_path):
    weights = tmp_path / "weights"
    release([tiny_sweep], weights, "gap_cnn")
    info = json.loads((weights / "gap_cnn.json").read_text())
    info["metrics"]["test/acc"] = 0.9955  # as if better weights were released before
    (weights / "gap_cnn.json").write_text(json.dumps(info))
    before = {p.name: p.read_bytes() for p in weights.iterdir()}
    with pytest.raises(
        MnistlabError, match=r"holds weights with test/acc 0.9955, above .*pass overwrite=true"
    ):
        release([tiny_sweep], weights, "gap_cnn")
    assert {p.name: p.read_bytes() for p in weights.iterdir()} == before
    release([tiny_sweep], weights, "gap_cnn", overwrite=True)
    released_set_is_one_unit(weights)


@pytest.mark.integration
@pytest.mark.parametrize("signal_name", ["SIGKILL", "SIGTERM"])
def test_a_release_killed_between_its_files_leaves_the_previous_set_whole(tiny_sweep, tmp_path, signal_name):
    """A real release process killed once its new .pt is written and before its .onnx and .json
    are: the three files in weights/ are still one set, the previous one."""
    weights = tmp_path / "weights"
    release([tiny_sweep / "1"], weights, "gap_cnn")  # the previous release: seed 2 alone
    before = {p.name: p.read_bytes() for p in weights.iterdir()}
    command = [sys.executable, "-m", "mnistlab.release", f"runs=[{tiny_sweep / '0'}]", f"out={weights}",
               "name=gap_cnn", "overwrite=true"]  # fmt: skip
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not list(weights.glob(".release-gap_cnn-*/gap_cnn.pt")):
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        time.sleep(0.01)
    process.send_signal(getattr(signal, signal_name))
    process.communicate(timeout=60)
    assert process.returncode == -getattr(signal, signal_name)
    assert {p.name: p.read_bytes() for p in weights.iterdir() if p.is_file()} == before
    released_set_is_one_unit(weights)
    info = release([tiny_sweep / "0"], weights, "gap_cnn", overwrite=True)  # the next release completes
    assert released_set_is_one_unit(weights)["seed"] == info["seed"] == 1
    assert not list(weights.glob(".*"))  # the killed release's staging folder is gone too


def test_a_release_killed_between_its_renames_is_finished_by_the_next_reader(tiny_sweep, tmp_path):
    """The disk as a kill leaves it after the staged set was marked complete and the .pt renamed:
    predict.py's loader (or the next release) finishes the renames before it reads anything."""
    old, new = tmp_path / "old", tmp_path / "new"
    release([tiny_sweep / "1"], old, "gap_cnn")
    release([tiny_sweep / "0"], new, "gap_cnn")
    staging = old / ".release-gap_cnn-4242"
    staging.mkdir()
    for suffix in (".onnx", ".json"):
        shutil.copy(new / f"gap_cnn{suffix}", staging / f"gap_cnn{suffix}")
    shutil.copy(new / "gap_cnn.pt", old / "gap_cnn.pt")  # renamed before the kill
    (old / ".gap_cnn.release").write_text(json.dumps({"staging": staging.name}))
    load_network(None, old / "gap_cnn.pt", GAP_CNN)
    assert released_set_is_one_unit(old)["seed"] == 1
    assert {p.name for p in old.iterdir()} == {"gap_cnn.pt", "gap_cnn.onnx", "gap_cnn.json"}


@pytest.mark.integration  # the first 1,000 official test digits: the real files, fetched into data/
def test_the_released_weights_classify_real_test_digits_in_pytorch_and_onnx():
    """weights/gap_cnn.{pt,onnx} as committed: the predict.py default, and its ONNX twin."""
    ensure_files(ROOT / "data", MNIST_FILES, MNIST_MD5, MNIST_SOURCES)
    net = load_network(None, ROOT / "weights" / "gap_cnn.pt", GAP_CNN)
    images = standardize(to_unit(read_idx(ROOT / "data" / TEST_IMAGES)[:1000]))
    labels = read_idx(ROOT / "data" / TEST_LABELS)[:1000].long()
    with torch.no_grad():
        logits = net(images)
    assert (logits.argmax(1) == labels).float().mean() >= 0.99
    onnx = onnx_logits(ROOT / "weights" / "gap_cnn.onnx", images)
    assert np.abs(onnx - logits.numpy()).max() < 1e-4
    info = json.loads((ROOT / "weights" / "gap_cnn.json").read_text())
    assert info["params"] == 19_348 and info["command"].startswith("python train.py experiment=robust")


def test_runs_without_validation_release_their_smallest_seed_never_the_best_test():
    def record(seed, test_acc, val=None):
        return Run(Path(str(seed)), {}, [], {"seed": seed, "test/acc": test_acc, "val/acc_best": val})

    trained_on_60k = [record(3, 0.995), record(1, 0.990), record(2, 0.999)]
    assert median_run(trained_on_60k).metrics["seed"] == 1
    with_validation = [record(1, 0.99, 0.991), record(2, 0.99, 0.993), record(3, 0.99, 0.992)]
    assert median_run(with_validation).metrics["seed"] == 3

"""The stress test set: fixed, seeded distortions of the official test digits, labels intact,
tested by train.py after every run and by `eval.py stress=true`."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from omegaconf import OmegaConf

from conftest import ROOT
from mnistlab.cli import one_line_errors
from mnistlab.data import standardize, to_unit
from mnistlab.evaluate import evaluate
from mnistlab.predict import load_network
from mnistlab.stress import SEED, stress


def test_the_stress_set_is_the_same_every_time_and_distorts_every_digit(real_test_digits):
    images = real_test_digits[0]
    stressed = stress(images)
    assert stressed.dtype == torch.uint8 and stressed.shape == images.shape
    assert torch.equal(stressed, stress(images.clone()))  # fixed seed: same set on every run
    assert not torch.equal(stressed, stress(images, seed=1))  # another seed (for validation) differs
    changed = (stressed.float() - images.float()).abs().flatten(1).mean(1) > 5
    assert changed.all()  # each digit got its own distortion
    assert not torch.equal(stressed[:20], stress(images[:20])[torch.randperm(20)])


def test_stressed_digits_keep_their_labels(real_test_digits):
    """Mild enough that the released gap_cnn still reads 38 of the first 40 (a 6 does not become
    a 9, a 1 stays a 1)."""
    images, labels = real_test_digits
    net = load_network(
        None, ROOT / "weights" / "gap_cnn.pt", OmegaConf.load(ROOT / "conf/model/gap_cnn.yaml")
    )
    with torch.no_grad():
        read = net(standardize(to_unit(stress(images)))).argmax(1)
    assert (read == labels).sum() >= 38


def test_train_records_stress_acc_and_eval_stress_true_reproduces_it(
    finished_run, compose_train, tmp_path, capsys
):
    run_dir = tmp_path / "run"
    shutil.copytree(finished_run, run_dir)
    recorded = json.loads((run_dir / "metrics.json").read_text())
    assert 0 <= recorded["stress/acc"] <= 1 and recorded["stress/loss"] > 0
    del recorded["stress/acc"]  # a record without it: eval adds it back
    (run_dir / "metrics.json").write_text(json.dumps(recorded))
    best = run_dir / recorded["checkpoint"]
    evaluated = one_line_errors(evaluate)(
        compose_train(f"ckpt_path={best}", "stress=true", config_name="eval")
    )
    assert set(evaluated) == {f"{s}/{m}" for s in ("test", "stress", "stress_val") for m in ("acc", "loss")}
    assert evaluated["stress/loss"] != evaluated["test/loss"]  # other images (a debug run: acc near chance)
    again = json.loads((run_dir / "metrics.json").read_text())
    assert (
        again["stress/acc"]
        == pytest.approx(evaluated["stress/acc"])
        == pytest.approx(json.loads((finished_run / "metrics.json").read_text())["stress/acc"])
    )
    assert again["stress_val/acc"] == pytest.approx(recorded["stress_val/acc"])
    assert (
        json.loads(capsys.readouterr().out.strip().splitlines()[-1])["stress/acc"] == evaluated["stress/acc"]
    )


def test_the_stressed_validation_copy_is_the_validation_split_distorted_with_its_own_seed(tiny_mnist):
    """What a recipe is chosen by: the validation digits and labels, under another seed than the
    stress test set's, so choosing never looks at the set that is reported."""
    from mnistlab.data import IDXDataModule
    from mnistlab.stress import VAL_SEED

    options = {"data_dir": str(tiny_mnist.data_dir), "checksums": tiny_mnist.checksums, "train_size": 1000,
               "val_size": 200, "digits": True}  # fmt: skip
    plain, stressed = IDXDataModule(**options), IDXDataModule(**options, test_set="stress_val")
    plain.setup(), stressed.setup()
    assert torch.equal(stressed.test_set.labels, plain.val_set.labels)
    assert torch.equal(stressed.test_set.images, stress(plain.val_set.images, seed=VAL_SEED))
    assert VAL_SEED != SEED

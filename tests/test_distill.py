"""Distillation from frozen teachers (distill.py) and test-time augmentation (eval.py tta=true),
with the real Trainer on the tiny data and the released gap_cnn as the teacher."""

from __future__ import annotations

import hashlib
import json

import lightning as L
import pytest
import torch
from omegaconf import OmegaConf

from conftest import CONF, ROOT
from mnistlab import MnistlabError
from mnistlab.augment import fixed_affine, tta_views
from mnistlab.cli import one_line_errors
from mnistlab.data import IDXDataModule
from mnistlab.distill import Distillation
from mnistlab.evaluate import evaluate
from mnistlab.module import Classifier
from mnistlab.train import train

RELEASED = ROOT / "weights" / "gap_cnn.pt"
STUDENT = OmegaConf.to_container(OmegaConf.load(CONF / "model" / "micro_cnn.yaml"))
ADAM = {"_target_": "torch.optim.Adam", "_partial_": True, "lr": 0.01}


class FirstLosses(L.Callback):
    """The loss each training step returned, as the optimiser saw it."""

    def __init__(self):
        self.losses = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))


def fit_student(tiny_mnist, distillation: Distillation | None, steps: int = 3) -> tuple[Classifier, list]:
    L.seed_everything(0, verbose=False)
    student = Classifier(STUDENT, ADAM, distillation=distillation)
    losses = FirstLosses()
    datamodule = IDXDataModule(
        tiny_mnist.data_dir, checksums=tiny_mnist.checksums, batch_size=100, train_size=1000, val_size=200
    )
    trainer = L.Trainer(
        max_steps=steps, limit_val_batches=0, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", callbacks=[losses],
    )  # fmt: skip
    trainer.fit(student, datamodule=datamodule)
    return student, losses.losses


def test_the_teacher_is_frozen_and_kept_out_of_the_student(tiny_mnist):
    teacher = Distillation([str(RELEASED)], temperature=4.0, weight=0.5)
    before = {k: v.clone() for k, v in teacher.nets[0].state_dict().items()}
    student, _ = fit_student(tiny_mnist, teacher)
    after = teacher.nets[0].state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # BatchNorm statistics included
    assert not teacher.nets[0].training and not any(p.requires_grad for p in teacher.nets[0].parameters())
    # the student's parameters, optimiser and checkpoint hold the student only
    assert {k.split(".")[0] for k in student.state_dict()} == {"net", "val_acc_best"}
    optimised = sum(
        p.numel() for group in student.trainer.optimizers[0].param_groups for p in group["params"]
    )
    assert optimised == sum(p.numel() for p in student.net.parameters()) == 982


def test_the_students_loss_uses_the_teacher(tiny_mnist):
    _, plain = fit_student(tiny_mnist, None)
    _, weight_0 = fit_student(tiny_mnist, Distillation([str(RELEASED)], temperature=4.0, weight=0.0))
    _, weight_half = fit_student(tiny_mnist, Distillation([str(RELEASED)], temperature=4.0, weight=0.5))
    assert weight_0 == pytest.approx(plain, abs=1e-6)  # weight 0: the labels' loss alone
    assert weight_half[0] != pytest.approx(plain[0], abs=1e-3)


def test_a_distilled_run_records_its_teachers_files_and_hashes(compose_train, tmp_path, finished_run):
    run_dir, _ = finished_run  # a checkpoint train.py wrote: the second teacher of an ensemble
    checkpoint = run_dir / json.loads((run_dir / "metrics.json").read_text())["checkpoint"]
    teachers = f"distill.teachers=[{RELEASED},{checkpoint}]"
    metrics = train(compose_train("debug=limit", "distill=gap_cnn", teachers, "distill.weight=0.7"))
    recorded = json.loads((tmp_path / "metrics.json").read_text())["teacher"]
    assert recorded == metrics["teacher"]
    files = [RELEASED, RELEASED.with_suffix(".json"), checkpoint]
    assert recorded["files"] == [
        {"path": str(f.resolve()), "sha256": hashlib.sha256(f.read_bytes()).hexdigest()} for f in files
    ]
    assert (recorded["temperature"], recorded["weight"]) == (4.0, 0.7)
    logged = (tmp_path / "csv" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"train/teacher_acc", "train/agreement", "train/distill_loss"} <= set(logged)


def test_a_run_without_a_teacher_records_none(finished_run):
    run_dir, _ = finished_run
    assert "teacher" not in json.loads((run_dir / "metrics.json").read_text())


@pytest.mark.parametrize(
    "override, message",
    [
        ("distill.teachers=[missing/gap_cnn.pt]", "teacher file missing/gap_cnn.pt does not exist"),
        ("distill.teachers=[conf/train.yaml]", "is neither a checkpoint (.ckpt) nor released weights"),
        ("distill.weight=1.5", "distill.weight=1.5 is not allowed; use a value in [0, 1]"),
        ("distill.temperature=0", "distill.temperature=0 is not allowed; use a value > 0"),
    ],
)
def test_a_bad_teacher_is_one_line_before_any_work(compose_train, capsys, override, message):
    with pytest.raises(SystemExit) as exit_info:
        one_line_errors(train)(compose_train("debug=fdr", "distill=gap_cnn", override))
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_tta_views_start_with_the_image_itself_and_move_it_as_named():
    images = torch.zeros(1, 1, 28, 28)
    images[0, 0, 10, 10] = 1.0
    views = tta_views(images)
    assert views[0] is images and len(views) == 7
    torch.testing.assert_close(fixed_affine(images, 0, 0, 0), images)
    moved = fixed_affine(images, 0, 1, 0)  # one pixel right
    assert moved[0, 0, 10, 11] == pytest.approx(1.0) and moved[0, 0, 10, 10] == pytest.approx(0.0)


def test_eval_with_tta_reports_it_beside_the_plain_figure(finished_run, compose_train, capsys):
    run_dir, _ = finished_run
    metrics = json.loads((run_dir / "metrics.json").read_text())
    best = run_dir / metrics["checkpoint"]
    cfg = compose_train(f"ckpt_path={best}", "tta=true", config_name="eval")
    evaluated = one_line_errors(evaluate)(cfg)
    assert evaluated["test/acc"] == pytest.approx(metrics["test/acc"])  # the plain figure unchanged
    assert 0 <= evaluated["test/acc_tta"] <= 1
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (
        printed["test/acc"] == evaluated["test/acc"] and printed["test/acc_tta"] == evaluated["test/acc_tta"]
    )
    recorded = json.loads((run_dir / "metrics.json").read_text())  # the run's record gains it
    assert (
        recorded["test/acc_tta"] == evaluated["test/acc_tta"] and recorded["test/acc"] == metrics["test/acc"]
    )


def test_distillation_refuses_a_teacher_list_given_as_one_string():
    with pytest.raises(MnistlabError, match="is not a list of files"):
        Distillation(str(RELEASED))

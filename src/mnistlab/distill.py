"""Knowledge distillation: a student learns from the labels and from frozen teachers' softened
outputs (Hinton et al. 2015, "Distilling the Knowledge in a Neural Network"):

    loss = (1 - weight) * CE(student, labels) + weight * T^2 * KL(p_teacher,T || p_student,T)

where p_x,T = softmax(logits_x / T); T^2 keeps the soft term's gradients on the scale of the
hard one's as T changes. Any student, any teacher: a teacher is released weights
(`weights/<name>.pt` with the `<name>.json` beside it, whose `model` names the layers) or a
checkpoint written by train.py; several teachers are an ensemble whose softened probabilities
are averaged. The teachers see the student's augmented batch, in eval mode and without
gradients; they live outside the student's module, so they are never in its optimizer, its
moving average or its checkpoint.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from mnistlab import MnistlabError, as_number


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def teacher_files(path: Path) -> list[Path]:
    """The files a teacher is made of: a checkpoint, or released weights and their JSON."""
    if path.suffix == ".ckpt":
        files = [path]
    elif path.suffix == ".pt":
        files = [path, path.with_suffix(".json")]
    else:
        raise MnistlabError(
            f"teacher {path} is neither a checkpoint (.ckpt) nor released weights (.pt); "
            "pass distill.teachers=[weights/gap_cnn.pt] or a logs/.../checkpoints/*.ckpt"
        )
    for file in files:
        if not file.is_file():
            raise MnistlabError(
                f"teacher file {file} does not exist; pass distill.teachers=[PATH] naming a .ckpt "
                "written by train.py or released .pt weights with their .json beside them"
            )
    return files


def load_teacher(path: Path) -> nn.Module:
    """The teacher's network in eval mode with frozen weights."""
    from mnistlab.module import load_classifier
    from mnistlab.predict import load_network

    files = teacher_files(path)
    if path.suffix == ".ckpt":
        net = load_classifier(path).net
    else:
        try:
            layers = json.loads(files[1].read_text())["model"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise MnistlabError(
                f"{files[1]} does not name the teacher's layers (a `model` list, as make release "
                "writes); pass a .ckpt written by train.py instead"
            ) from None
        net = load_network(None, path, {"_target_": "mnistlab.models.build_net", "layers": layers})
    return net.eval().requires_grad_(False)


class Distillation:
    """The teachers and the mixed loss; `Classifier.training_step` asks it for the loss."""

    def __init__(self, teachers: list[str], temperature: float = 4.0, weight: float = 0.5):
        if not teachers or isinstance(teachers, str):
            raise MnistlabError(
                f"distill.teachers={teachers!r} is not a list of files; pass distill.teachers=[PATH,...]"
            )
        if not as_number(temperature) > 0:
            raise MnistlabError(f"distill.temperature={temperature!r} is not allowed; use a value > 0")
        if not 0 <= as_number(weight) <= 1:
            raise MnistlabError(f"distill.weight={weight!r} is not allowed; use a value in [0, 1]")
        self.paths = [Path(str(t)).expanduser() for t in teachers]
        self.temperature, self.weight = float(temperature), float(weight)
        self.nets = [load_teacher(path) for path in self.paths]

    def record(self) -> dict:
        """What metrics.json says about the teacher: its files with their hashes, T and the weight."""
        files = [file for path in self.paths for file in teacher_files(path)]
        return {
            "files": [{"path": str(file.resolve()), "sha256": sha256(file)} for file in files],
            "temperature": self.temperature,
            "weight": self.weight,
        }

    @torch.no_grad()
    def probabilities(self, images: torch.Tensor) -> torch.Tensor:
        """The teachers' averaged probabilities at temperature T."""
        total = 0
        for net in self.nets:
            net.to(images.device).eval()  # a no-op after the first batch on a device
            total = total + torch.softmax(net(images).float() / self.temperature, dim=1)
        return total / len(self.nets)

    def loss(
        self, logits: torch.Tensor, images: torch.Tensor, labels: torch.Tensor, label_loss: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The training loss mixing `label_loss` with the soft term, and what to log: the soft
        term, the teachers' accuracy on this batch, and how often the student agrees with them."""
        teacher = self.probabilities(images)
        student = F.log_softmax(logits.float() / self.temperature, dim=1)
        soft = F.kl_div(student, teacher, reduction="batchmean") * self.temperature**2
        loss = (1 - self.weight) * label_loss + self.weight * soft
        teacher_digit = teacher.argmax(1)
        logs = {
            "train/distill_loss": soft,
            "train/teacher_acc": (teacher_digit == labels).float().mean(),
            "train/agreement": (teacher_digit == logits.argmax(1)).float().mean(),
        }
        return loss, logs

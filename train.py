"""Fit a model, then test its best checkpoint: `python train.py [overrides]` (see README)."""

import hydra

from mnistlab.cli import launch, one_line_errors
from mnistlab.runs import RunDir
from mnistlab.train import train


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
@one_line_errors
def main(cfg):
    """Returns the run's val/acc_best: what a Hydra sweeper plugin (Optuna, Nevergrad, Ax) optimises."""
    return train(cfg, RunDir.from_hydra())["val/acc_best"]


if __name__ == "__main__":
    launch(main)

"""Fit a model, then test its best checkpoint: `python train.py [overrides]` (see README)."""

import hydra

from mnistlab.cli import one_line_errors
from mnistlab.train import train


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
@one_line_errors
def main(cfg):
    train(cfg)


if __name__ == "__main__":
    main()

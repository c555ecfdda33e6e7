"""Test a checkpoint: `python eval.py ckpt_path=logs/runs/<run>/checkpoints/last.ckpt`."""

import hydra

from mnistlab.cli import launch, one_line_errors
from mnistlab.evaluate import evaluate


@hydra.main(version_base="1.3", config_path="conf", config_name="eval")
@one_line_errors
def main(cfg):
    evaluate(cfg)


if __name__ == "__main__":
    launch(main)

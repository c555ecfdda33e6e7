"""Print the composed model's per-layer table: `python summary.py [overrides]`."""

import hydra

from mnistlab.cli import launch, one_line_errors
from mnistlab.summary import print_summary


@hydra.main(version_base="1.3", config_path="conf", config_name="summary")
@one_line_errors
def main(cfg):
    print_summary(cfg.model, cfg.data)


if __name__ == "__main__":
    launch(main)

"""Print the composed model's per-layer table: `python summary.py [overrides]`."""

import hydra
from hydra.utils import instantiate

from mnistlab.cli import one_line_errors
from mnistlab.summary import format_table


@hydra.main(version_base="1.3", config_path="conf", config_name="summary")
@one_line_errors
def main(cfg):
    print(format_table(instantiate(cfg.model)))


if __name__ == "__main__":
    main()

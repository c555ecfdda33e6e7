"""A checkpoint as ONNX: `python export.py ckpt_path=PATH [output=FILE.onnx]`."""

import hydra

from mnistlab.cli import launch, one_line_errors
from mnistlab.export import export


@hydra.main(version_base="1.3", config_path="conf", config_name="export")
@one_line_errors
def main(cfg):
    export(cfg)


if __name__ == "__main__":
    launch(main)

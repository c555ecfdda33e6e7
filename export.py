"""A checkpoint as ONNX: `python export.py ckpt_path=PATH [output=weights/gap_cnn.onnx]`."""

import hydra

from mnistlab.cli import one_line_errors
from mnistlab.export import run


@hydra.main(version_base="1.3", config_path="conf", config_name="export")
@one_line_errors
def main(cfg):
    run(cfg)


if __name__ == "__main__":
    main()

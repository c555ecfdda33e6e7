"""mnistlab: small-CNN experiments on MNIST with Lightning and Hydra."""

import os

from omegaconf import OmegaConf

# Run directories are named by time and process id, so two runs started in the same second
# never share one (see conf/hydra/default.yaml).
OmegaConf.register_new_resolver("pid", os.getpid, replace=True)


class MnistlabError(Exception):
    """Bad input from the user: the entry points print it as one line and exit non-zero."""

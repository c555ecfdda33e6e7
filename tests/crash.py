"""A callback that kills its own process, to test resuming after a hard crash (SIGKILL)."""

import os
import signal

import lightning as L


class SigkillAtEpochStart(L.Callback):
    """Kills the process as epoch `epoch` starts, after the previous epoch's checkpoints exist."""

    def __init__(self, epoch: int):
        self.epoch = epoch

    def on_train_epoch_start(self, trainer, module):
        if trainer.current_epoch == self.epoch:
            os.kill(os.getpid(), signal.SIGKILL)

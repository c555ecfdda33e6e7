"""Callbacks that signal their own process at a known point, to test what survives a kill."""

import os
import signal

import lightning as L


class SignalAtEpochStart(L.Callback):
    """Sends `signal` (SIGKILL, SIGTERM, SIGINT) to this process as epoch `epoch` starts, after the
    previous epoch's checkpoints exist."""

    def __init__(self, epoch: int, signal: str = "SIGKILL"):
        self.epoch, self.signal = epoch, getattr(signal_module, signal)

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if trainer.current_epoch == self.epoch and batch_idx == 1:
            os.kill(os.getpid(), self.signal)


signal_module = signal

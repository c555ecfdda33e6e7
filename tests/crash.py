"""Callbacks that signal their own process at a known point, to test what survives a kill."""

import os
import signal
import time

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


class PauseAtEpochStart(L.Callback):
    """Waits (up to `seconds`) as epoch `epoch` starts, after writing `marker`: a job held still
    at a known point, for a scheduler to cancel. A SIGTERM ends the wait."""

    def __init__(self, epoch: int, marker: str, seconds: float = 120):
        self.epoch, self.marker, self.seconds = epoch, marker, seconds

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if trainer.current_epoch == self.epoch and batch_idx == 0:
            open(self.marker, "w").close()
            deadline = time.monotonic() + self.seconds
            while time.monotonic() < deadline and not trainer.received_sigterm:
                time.sleep(0.2)


class HoldAtEpochStart(L.Callback):
    """Holds a run still as epoch `epoch` starts, while `marker` exists (it writes it, the test
    deletes it): a run in progress at a known point, for a second process to run into."""

    def __init__(self, epoch: int, marker: str, seconds: float = 300):
        self.epoch, self.marker, self.seconds = epoch, marker, seconds

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if trainer.current_epoch == self.epoch and batch_idx == 0:
            open(self.marker, "w").close()
            deadline = time.monotonic() + self.seconds
            while time.monotonic() < deadline and os.path.exists(self.marker):
                time.sleep(0.1)


class SignalAtTestStart(L.Callback):
    """Sends SIGTERM to this process as the test of the best checkpoint starts."""

    def on_test_start(self, trainer, module):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler raises while this waits

"""A researcher's own callback: the gradient norm before each optimizer step, logged per epoch."""

import lightning as L
import torch


class GradientNorm(L.Callback):
    """`train/grad_norm`: the L2 norm of all gradients, the epoch's mean; a rising one warns of
    a learning rate too high before the loss shows it."""

    def on_before_optimizer_step(self, trainer, module, optimizer):
        grads = [p.grad.detach().flatten() for p in module.parameters() if p.grad is not None]
        if grads:
            norm = torch.linalg.vector_norm(torch.cat(grads))
            module.log("train/grad_norm", norm, on_step=False, on_epoch=True)

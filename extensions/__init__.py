"""A researcher's own code: networks, callbacks, metrics, anything a config names by `_target_`.

Every entry point (train.py, eval.py, summary.py, ...) can import `extensions.<module>` from any
folder, so `_target_: extensions.small_resnet.SmallResNet` works wherever the command is typed.
See docs/extending.md for worked examples.
"""

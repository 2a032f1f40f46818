"""Offline half of prefixserve: datasets, trainable prefixes, the training loop, export, evaluation and upload.

Entry points are in `training.cli` (`prefixserve train|eval|upload`); see docs/training.md.
"""

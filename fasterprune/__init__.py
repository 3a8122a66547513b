"""Prune neural networks while they train: one fastai callback, exact masks, honest numbers.

Modules:

- `fasterprune.learner`: Every change fasterprune makes to fastai's classes, in one place: what it changes, and why"""

__version__ = "0.0.1"

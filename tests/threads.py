"""Pinning torch's threads in tests that train or sample (two torch jobs on two cores
oversubscribe badly; tiny networks run fastest on one): the toolkit's own `torch_threads`,
which ``--threads`` uses."""

from __future__ import annotations

from toolkit.generation.generate import torch_threads

__all__ = ["torch_threads"]

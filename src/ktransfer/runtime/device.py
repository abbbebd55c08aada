"""The one device rule of training, evaluation and the experiments.

``auto`` is ``cuda`` when a GPU is visible, else ``cpu``; under torchrun with several processes, ``cuda`` (and
``auto`` on a GPU machine) means GPU ``LOCAL_RANK`` (the GPU ``distributed.init`` made current); anything else
(``cpu``, ``cuda:1``, ``mps``) is used as given. A CUDA device on a machine without CUDA is refused.
"""

from __future__ import annotations

import torch

from ktransfer.runtime import distributed

# the one device default of `train` (train.device), `evaluate`, `translate`, `generate` and `distill-data`
DEFAULT_DEVICE = "auto"


class DeviceError(ValueError):
    """A device that this machine does not have (``cuda`` without CUDA)."""


def choose_device(name: str) -> torch.device:
    """``name`` (``auto``, ``cpu``, ``cuda``, ``cuda:N``, ...) as this process's ``torch.device``.

    Raises:
        DeviceError: a CUDA device was asked for and CUDA is not available.
    """
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise DeviceError(f"{name!r} requested but CUDA is not available on this machine (use cpu or auto)")
    if name == "cuda" and distributed.world_size() > 1:
        return torch.device("cuda", distributed.local_rank())
    return torch.device(name)

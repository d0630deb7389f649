"""The compute precision of a training step: bf16 autocast where the config and the device ask for it."""

import contextlib

import torch

from mymoe.config import Config


def autocast_context(config: Config, device: torch.device):
    """bf16 autocast on GPUs (precision auto or bf16) and on CPU only when asked (precision bf16)."""
    precision = config.train.precision
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()

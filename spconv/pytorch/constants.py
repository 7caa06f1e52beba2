"""Torch-version facts with spconv's names."""
import torch

PYTORCH_VERSION = [int(v) for v in torch.__version__.split("+")[0].split(".")[:3] if v.isdigit()]
TORCH_HAS_AMP = PYTORCH_VERSION >= [1, 6]


def is_amp_enabled() -> bool:
    return torch.is_autocast_enabled("cuda") or torch.is_autocast_enabled("cpu")

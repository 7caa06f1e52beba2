"""Feature-wise modules: batch normalisation (fused with a leaky ReLU, as in SparseConvNet),
activations, dropout and Identity. All map ``[N, C] -> [N, C]`` at the same sites.
"""
import torch
import torch.nn.functional as F
from torch import nn

from spconv.scn.tensor import SparseConvNetTensor, check_tensor, derive


class BatchNormalization(nn.Module):
    """Batch norm over the active sites, then ``leaky_relu(x, leakiness)`` (1: none, 0: ReLU).

    SparseConvNet's conventions: ``momentum`` is the weight of the **old** running statistics
    (``running = momentum * running + (1 - momentum) * batch``, i.e. torch momentum ``1 - momentum``);
    the batch variance is the biased one, the running variance the unbiased one. Buffers
    ``running_mean``/``running_var``; parameters ``weight``/``bias`` when ``affine``.
    """

    def __init__(self, nPlanes: int, eps: float = 1e-4, momentum: float = 0.9, affine: bool = True,
                 leakiness: float = 1):
        super().__init__()
        self.nPlanes = int(nPlanes)
        self.eps = eps
        self.momentum = momentum
        self.affine = affine
        self.leakiness = leakiness
        self.register_buffer("running_mean", torch.zeros(self.nPlanes))
        self.register_buffer("running_var", torch.ones(self.nPlanes))
        if affine:
            self.weight = nn.Parameter(torch.ones(self.nPlanes))
            self.bias = nn.Parameter(torch.zeros(self.nPlanes))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        self._register_load_state_dict_pre_hook(self._rename_old_buffers)

    @staticmethod
    def _rename_old_buffers(state_dict, prefix, *args):
        for old, new in (("runningMean", "running_mean"), ("runningVar", "running_var")):
            if prefix + old in state_dict and prefix + new not in state_dict:
                state_dict[prefix + new] = state_dict.pop(prefix + old)

    def forward(self, input: SparseConvNetTensor) -> SparseConvNetTensor:
        check_tensor(input, repr(self), None, self.nPlanes)
        x = input.features
        if x.numel() == 0:
            return input
        w = self.weight.to(x.dtype) if self.weight is not None else None
        b = self.bias.to(x.dtype) if self.bias is not None else None
        if self.training and x.shape[0] < 2:
            # one site: the batch variance is 0 (torch refuses this case; SparseConvNet divides by zero)
            y = (x - x.mean(0, keepdim=True)) * (1.0 / (self.eps ** 0.5))
            y = y * w + b if w is not None else y
        else:
            y = F.batch_norm(x, self.running_mean, self.running_var, w, b, self.training, 1 - self.momentum,
                             self.eps)
        if self.leakiness != 1:
            y = F.leaky_relu(y, self.leakiness) if self.leakiness else F.relu(y)
        return derive(input, y)

    def input_spatial_size(self, out_size):
        return out_size

    def extra_repr(self):
        s = f"{self.nPlanes}, eps={self.eps}, momentum={self.momentum}, affine={self.affine}"
        return s + (f", leakiness={self.leakiness}" if self.leakiness != 1 else "")


class BatchNormReLU(BatchNormalization):
    """BatchNormalization followed by ReLU."""

    def __init__(self, nPlanes: int, eps: float = 1e-4, momentum: float = 0.9):
        super().__init__(nPlanes, eps, momentum, True, 0)


class BatchNormLeakyReLU(BatchNormalization):
    """BatchNormalization followed by a leaky ReLU (default slope 0.333)."""

    def __init__(self, nPlanes: int, eps: float = 1e-4, momentum: float = 0.9, leakiness: float = 0.333):
        super().__init__(nPlanes, eps, momentum, True, leakiness)


class _FeatureFn(nn.Module):
    def forward(self, input: SparseConvNetTensor) -> SparseConvNetTensor:
        check_tensor(input, type(self).__name__)
        return derive(input, self.fn(input.features))

    def input_spatial_size(self, out_size):
        return out_size


class ReLU(_FeatureFn):
    def fn(self, x):
        return F.relu(x)


class LeakyReLU(_FeatureFn):
    def __init__(self, leak: float = 1 / 3):
        super().__init__()
        self.leak = leak

    def fn(self, x):
        return F.leaky_relu(x, self.leak)

    def extra_repr(self):
        return f"leak={self.leak}"


class ELU(_FeatureFn):
    def fn(self, x):
        return F.elu(x)


class SELU(_FeatureFn):
    def fn(self, x):
        return F.selu(x)


class Sigmoid(_FeatureFn):
    def fn(self, x):
        return torch.sigmoid(x)


class Tanh(_FeatureFn):
    def fn(self, x):
        return torch.tanh(x)


def BatchNormELU(nPlanes: int, eps: float = 1e-4, momentum: float = 0.9):
    """``Sequential(BatchNormalization, ELU)``."""
    from spconv.scn.containers import Sequential
    return Sequential(BatchNormalization(nPlanes, eps, momentum), ELU())


class Dropout(_FeatureFn):
    """SparseConvNet's non-inverted dropout: training zeroes each value with probability ``p``;
    evaluation multiplies by ``1 - p``."""

    def __init__(self, p: float = 0.5):
        super().__init__()
        self.p = p

    def fn(self, x):
        if self.training:
            return x * torch.bernoulli(torch.full_like(x, 1 - self.p))
        return x * (1 - self.p)

    def extra_repr(self):
        return f"p={self.p}"


class BatchwiseDropout(Dropout):
    """Like :class:`Dropout`, with one keep/drop decision per feature plane for the whole batch."""

    def fn(self, x):
        if self.training:
            return x * torch.bernoulli(x.new_full((1, x.shape[1]), 1 - self.p))
        return x * (1 - self.p)


class Identity(nn.Module):
    def forward(self, input):
        return input

    def input_spatial_size(self, out_size):
        return out_size

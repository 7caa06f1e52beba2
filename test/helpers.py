"""Shared test helpers: random sparse inputs and dense PyTorch references (independent of spconv)."""
import numpy as np
import torch
import torch.nn.functional as F

DENSE_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
DENSE_CONV_T = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


def random_sparse(shape, batch_size, density, channels, dtype=torch.float32, seed=0, low=-1.0, high=1.0):
    """Unique random sites per batch: (features [N, C], indices int32 [N, 1+D])."""
    g = np.random.default_rng(seed)
    volume = int(np.prod(shape))
    rows = []
    for b in range(batch_size):
        n = max(1, int(volume * density))
        flat = g.choice(volume, size=n, replace=False)
        coords = np.stack(np.unravel_index(flat, shape), 1)
        rows.append(np.concatenate([np.full((n, 1), b), coords], 1))
    indices = torch.from_numpy(np.concatenate(rows)).int()
    features = torch.from_numpy(g.uniform(low, high, size=(len(indices), channels))).to(dtype)
    return features, indices


def to_dense(features, indices, shape, batch_size):
    """[B, C, *shape] dense tensor (differentiable in features), built with plain indexing."""
    out = features.new_zeros((batch_size, *shape, features.shape[1]))
    idx = tuple(indices[:, d].long() for d in range(indices.shape[1]))
    out = out.index_put(idx, features)
    return out.movedim(-1, 1)


def gather_sites(dense, indices):
    """Rows [N, C] of a dense [B, C, *shape] tensor at the sites."""
    idx = tuple(indices[:, d].long() for d in range(indices.shape[1]))
    return dense.movedim(1, -1)[idx]


def torch_conv_weight(weight, groups=1):
    """spconv [O, *k, I/g] -> torch conv weight [O, I/g, *k]."""
    nd = weight.dim() - 2
    return weight.permute(0, nd + 1, *range(1, nd + 1))


def torch_conv_t_weight(weight, groups=1):
    """spconv [O, *k, I/g] -> torch transposed-conv weight [I, O/g, *k]."""
    nd = weight.dim() - 2
    o, i_g = weight.shape[0], weight.shape[-1]
    w = weight.reshape(groups, o // groups, *weight.shape[1:-1], i_g)  # [G, O/g, *k, I/g]
    w = w.permute(0, nd + 2, 1, *range(2, nd + 2))  # [G, I/g, O/g, *k]
    return w.reshape(groups * i_g, o // groups, *weight.shape[1:-1])


def dense_conv(x, w, stride, padding, dilation, groups=1):
    """N-D cross-correlation (torch semantics); 4-D is decomposed into 3-D convs over dim 0."""
    nd = x.dim() - 2
    if nd <= 3:
        return DENSE_CONV[nd](x, w, None, stride, padding, dilation, groups)
    s0, p0, d0, k0 = stride[0], padding[0], dilation[0], w.shape[2]
    xp = F.pad(x, [0, 0] * 3 + [p0, p0])
    out_len = (xp.shape[2] - d0 * (k0 - 1) - 1) // s0 + 1
    slices = []
    for t in range(out_len):
        acc = 0
        for r in range(k0):
            acc = acc + F.conv3d(xp[:, :, t * s0 + r * d0], w[:, :, r], None, stride[1:], padding[1:], dilation[1:],
                                 groups)
        slices.append(acc)
    return torch.stack(slices, 2)


def dense_conv_transpose(x, w, stride, padding, dilation, groups=1, output_padding=None):
    """N-D transposed conv (torch semantics); 4-D is decomposed over dim 0."""
    nd = x.dim() - 2
    output_padding = output_padding or [0] * nd
    if nd <= 3:
        return DENSE_CONV_T[nd](x, w, None, stride, padding, output_padding, groups, dilation)
    s0, p0, d0, k0 = stride[0], padding[0], dilation[0], w.shape[2]
    full = (x.shape[2] - 1) * s0 + d0 * (k0 - 1) + 1 + output_padding[0]
    slices = [None] * full
    for u in range(x.shape[2]):
        for r in range(k0):
            y = F.conv_transpose3d(x[:, :, u], w[:, :, r], None, stride[1:], padding[1:], output_padding[1:], groups,
                                   dilation[1:])
            t = u * s0 + r * d0
            slices[t] = y if slices[t] is None else slices[t] + y
    zero = torch.zeros_like(next(s for s in slices if s is not None))
    out = torch.stack([s if s is not None else zero for s in slices], 2)
    return out[:, :, p0:full - p0]

"""Network builders with SparseConvNet's signatures and layer structure (so their state dicts line up).

- ``SparseVggNet(dimension, nInputPlanes, layers)``: entries ``'MP'`` (MaxPooling 3/2),
  ``['MP', size, stride]``, ``'C3/2'`` / ``['C3/2', n]`` (strided 3/2 Convolution + BatchNormReLU),
  ``['C', n]`` (3x3 submanifold + BatchNormReLU) and the VGG+ blocks ``['C', n, m1, ..., mk]``
  (k = 1..3): a submanifold branch with n planes joined with k branches that go 1..k scales down
  and back, then BatchNormReLU over ``n + sum(m)`` planes.
- ``SparseResNet(dimension, nInputPlanes, layers)``: pre-activation basic blocks, entries
  ``[blockType ('b...'), nPlanes, reps, stride]``.
- ``UNet(dimension, reps, nPlanes, residual_blocks=False, downsample=[2, 2], leakiness=0,
  n_input_planes=-1)``: output planes ``nPlanes[0]``.
- ``FullyConvolutionalNet(dimension, reps, nPlanes, residual_blocks=False, downsample=[2, 2])``:
  output planes ``sum(nPlanes)``.
"""
from spconv.scn.activations import BatchNormLeakyReLU, BatchNormReLU, Identity
from spconv.scn.containers import AddTable, ConcatTable, JoinTable, Sequential
from spconv.scn.conv import Convolution, Deconvolution, NetworkInNetwork, SubmanifoldConvolution
from spconv.scn.pool import MaxPooling, UnPooling


def _subm_bnr(seq: Sequential, dimension: int, a: int, b: int) -> Sequential:
    return seq.add(SubmanifoldConvolution(dimension, a, b, 3, False)).add(BatchNormReLU(b))


def _vgg_plus_branch(dimension: int, n_in: int, planes: int, depth: int) -> Sequential:
    """Down ``depth`` scales (3/2 convolution + submanifold conv), then back up with deconvolutions."""
    branch = Sequential()
    a = n_in
    for _ in range(depth):
        branch.add(Convolution(dimension, a, planes, 3, 2, False)).add(BatchNormReLU(planes))
        _subm_bnr(branch, dimension, planes, planes)
        a = planes
    for level in range(depth):
        if level:
            branch.add(BatchNormReLU(planes))
            _subm_bnr(branch, dimension, planes, planes)
        branch.add(Deconvolution(dimension, planes, planes, 3, 2, False))
    return branch


def SparseVggNet(dimension: int, nInputPlanes: int, layers) -> Sequential:
    """VGG-style net of submanifold convolutions (see the module docstring for ``layers``)."""
    n = nInputPlanes
    net = Sequential()
    for x in layers:
        if x == "MP":
            net.add(MaxPooling(dimension, 3, 2))
        elif x[0] == "MP":
            net.add(MaxPooling(dimension, x[1], x[2]))
        elif x == "C3/2" or x[0] == "C3/2":
            planes = n if x == "C3/2" else x[1]
            net.add(Convolution(dimension, n, planes, 3, 2, False)).add(BatchNormReLU(planes))
            n = planes
        elif x[0] == "C" and len(x) == 2:
            _subm_bnr(net, dimension, n, x[1])
            n = x[1]
        elif x[0] == "C" and 3 <= len(x) <= 5:
            table = ConcatTable().add(SubmanifoldConvolution(dimension, n, x[1], 3, False))
            for depth, planes in enumerate(x[2:], start=1):
                table.add(_vgg_plus_branch(dimension, n, planes, depth))
            net.add(table).add(JoinTable())
            n = sum(x[1:])
            net.add(BatchNormReLU(n))
        else:
            raise ValueError(f"SparseVggNet: unknown layer {x!r}; use 'MP', ['MP', size, stride], 'C3/2', "
                             "['C3/2', n], ['C', n] or ['C', n, m1[, m2[, m3]]]")
    return net


def SparseResNet(dimension: int, nInputPlanes: int, layers) -> Sequential:
    """Pre-activated ResNet of basic blocks; ``layers = [[blockType, nPlanes, reps, stride], ...]``."""
    n = nInputPlanes
    net = Sequential()
    for block_type, planes, reps, stride in layers:
        if not str(block_type).startswith("b"):
            raise ValueError(f"SparseResNet: only basic blocks ('b', 'basic') are supported, got {block_type!r}")
        for rep in range(reps):
            main = Sequential()
            if rep == 0:
                net.add(BatchNormReLU(n))
                if stride == 1:
                    main.add(SubmanifoldConvolution(dimension, n, planes, 3, False))
                else:
                    main.add(Convolution(dimension, n, planes, 3, stride, False))
                if stride > 1:
                    shortcut = Convolution(dimension, n, planes, 3, stride, False)
                elif n != planes:
                    shortcut = NetworkInNetwork(n, planes, False)
                else:
                    shortcut = Identity()
            else:
                main.add(BatchNormReLU(n)).add(SubmanifoldConvolution(dimension, n, planes, 3, False))
                shortcut = Identity()
            main.add(BatchNormReLU(planes)).add(SubmanifoldConvolution(dimension, planes, planes, 3, False))
            net.add(ConcatTable().add(main).add(shortcut))
            n = planes
            net.add(AddTable())
    net.add(BatchNormReLU(n))
    return net


def _block(seq: Sequential, dimension: int, a: int, b: int, residual: bool, norm):
    """One VGG block (norm-act, submanifold conv) or residual block (two of them plus a shortcut)."""
    if residual:
        body = Sequential().add(norm(a)).add(SubmanifoldConvolution(dimension, a, b, 3, False))
        body.add(norm(b)).add(SubmanifoldConvolution(dimension, b, b, 3, False))
        shortcut = Identity() if a == b else NetworkInNetwork(a, b, False)
        seq.add(ConcatTable().add(shortcut).add(body)).add(AddTable())
    else:
        seq.add(Sequential().add(norm(a)).add(SubmanifoldConvolution(dimension, a, b, 3, False)))


def UNet(dimension: int, reps: int, nPlanes, residual_blocks: bool = False, downsample=(2, 2), leakiness: float = 0,
         n_input_planes: int = -1) -> Sequential:
    """U-Net: at each level ``reps`` blocks, then a Convolution ``downsample = [size, stride]`` to
    the next level, the recursive U, a Deconvolution back, concatenation with the skip and
    ``reps`` more blocks. Input planes ``n_input_planes`` (default ``nPlanes[0]``), output
    ``nPlanes[0]``; normalisation is BatchNormLeakyReLU(leakiness)."""
    size, stride = downsample[0], downsample[1]

    def norm(p):
        return BatchNormLeakyReLU(p, leakiness=leakiness)

    def level(planes, n_in):
        seq = Sequential()
        for i in range(reps):
            _block(seq, dimension, n_in if (i == 0 and n_in != -1) else planes[0], planes[0], residual_blocks, norm)
        if len(planes) > 1:
            down = Sequential().add(norm(planes[0]))
            down.add(Convolution(dimension, planes[0], planes[1], size, stride, False))
            down.add(level(planes[1:], -1)).add(norm(planes[1]))
            down.add(Deconvolution(dimension, planes[1], planes[0], size, stride, False))
            seq.add(ConcatTable().add(Identity()).add(down)).add(JoinTable())
            for i in range(reps):
                _block(seq, dimension, planes[0] * (2 if i == 0 else 1), planes[0], residual_blocks, norm)
        return seq

    return level(list(nPlanes), n_input_planes)


def FullyConvolutionalNet(dimension: int, reps: int, nPlanes, residual_blocks: bool = False,
                          downsample=(2, 2)) -> Sequential:
    """Multi-scale net: every level's features are unpooled back to the input scale and
    concatenated; output planes ``sum(nPlanes)``."""
    size, stride = downsample[0], downsample[1]

    def level(planes):
        seq = Sequential()
        for _ in range(reps):
            _block(seq, dimension, planes[0], planes[0], residual_blocks, BatchNormReLU)
        if len(planes) > 1:
            down = Sequential().add(BatchNormReLU(planes[0]))
            down.add(Convolution(dimension, planes[0], planes[1], size, stride, False))
            down.add(level(planes[1:])).add(UnPooling(dimension, size, stride))
            seq.add(ConcatTable().add(Identity()).add(down)).add(JoinTable())
        return seq

    return level(list(nPlanes))

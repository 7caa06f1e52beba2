"""spconv.scn: SparseConvNet's hello world, IO layers and duplicate modes against numpy, OutputLayer
round trips, input_spatial_size arithmetic, rulebook caching, network builders, errors, examples."""
import os
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import spconv.scn as scn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCANNET = os.path.join(ROOT, "..", "shared", "data", "scannet_scene0000_00.bin")

# SparseConvNet's README "hello world" (facebookresearch/SparseConvNet, BSD licence), verbatim except the
# import line: `import sparseconvnet as scn` -> `import spconv.scn as scn`.
README_HELLO_WORLD = '''
import torch
import spconv.scn as scn

# Use the GPU if there is one, otherwise CPU
device = 'cuda:0' if torch.cuda.is_available() else 'cpu'

model = scn.Sequential().add(
    scn.SparseVggNet(2, 1,
                     [['C', 8], ['C', 8], ['MP', 3, 2],
                      ['C', 16], ['C', 16], ['MP', 3, 2],
                      ['C', 24], ['C', 24], ['MP', 3, 2]])
).add(
    scn.SubmanifoldConvolution(2, 24, 32, 3, False)
).add(
    scn.BatchNormReLU(32)
).add(
    scn.SparseToDense(2, 32)
).to(device)

# output will be 10x10
inputSpatialSize = model.input_spatial_size(torch.LongTensor([10, 10]))
input_layer = scn.InputLayer(2, inputSpatialSize)

msgs = [[" X   X  XXX  X    X    XX     X       X   XX   XXX   X    XXX   ",
         " X   X  X    X    X   X  X    X       X  X  X  X  X  X    X  X  ",
         " XXXXX  XX   X    X   X  X    X   X   X  X  X  XXX   X    X   X ",
         " X   X  X    X    X   X  X     X X X X   X  X  X  X  X    X  X  ",
         " X   X  XXX  XXX  XXX  XX       X   X     XX   X  X  XXX  XXX   "],

        [" XXX              XXXXX      x   x     x  xxxxx  xxx ",
         " X  X  X   XXX       X       x   x x   x  x     x  x ",
         " XXX                X        x   xxxx  x  xxxx   xxx ",
         " X     X   XXX       X       x     x   x      x    x ",
         " X     X          XXXX   x   x     x   x  xxxx     x ",]]


# Create Nx3 and Nx1 vectors to encode the messages above:
locations = []
features = []
for batchIdx, msg in enumerate(msgs):
    for y, line in enumerate(msg):
        for x, c in enumerate(line):
            if c == 'X':
                locations.append([y, x, batchIdx])
                features.append([1])
locations = torch.LongTensor(locations)
features = torch.FloatTensor(features).to(device)

input = input_layer([locations,features])
print('Input SparseConvNetTensor:', input)
output = model(input)

# Output is 2x32x10x10: our minibatch has 2 samples, the network has 32 output
# feature planes, and 10x10 is the spatial size of the output.
print('Output SparseConvNetTensor:', output)
'''

# The same network fed through the older README's InputBatch API (camelCase names, precomputeMetadata).
INPUT_BATCH_HELLO_WORLD = '''
import torch
import spconv.scn as scn
model = scn.Sequential().add(
    scn.SparseVggNet(2, 1, [['C', 8], ['C', 8], ['MP', 3, 2], ['C', 16], ['C', 16], ['MP', 3, 2],
                            ['C', 24], ['C', 24], ['MP', 3, 2]])
).add(scn.SubmanifoldConvolution(2, 24, 32, 3, False)).add(scn.BatchNormReLU(32)).add(scn.SparseToDense(2, 32))
inputSpatialSize = model.input_spatial_size(torch.LongTensor([10, 10]))
input = scn.InputBatch(2, inputSpatialSize)
msg = [" X   X  XXX  X    X    XX     X       X   XX   XXX   X    XXX   ",
       " X   X  X    X    X   X  X    X       X  X  X  X  X  X    X  X  ",
       " XXXXX  XX   X    X   X  X    X   X   X  X  X  XXX   X    X   X ",
       " X   X  X    X    X   X  X     X X X X   X  X  X  X  X    X  X  ",
       " X   X  XXX  XXX  XXX  XX       X   X     XX   X  X  XXX  XXX   "]
input.addSample()
for y, line in enumerate(msg):
    for x, c in enumerate(line):
        if c == 'X':
            input.setLocation(torch.LongTensor([x, y]), torch.FloatTensor([1]), 0)
input.addSample()
locations = []
features = []
for y, line in enumerate(msg):
    for x, c in enumerate(line):
        if c == 'X':
            locations.append([x, y])
            features.append([1])
input.setLocations(torch.LongTensor(locations), torch.FloatTensor(features), 0)
input.precomputeMetadata(3)
model.train()
output = model.forward(input)
'''


def test_readme_hello_world(capsys):
    ns = {}
    scn.forward_pass_multiplyAdd_count = scn.forward_pass_hidden_states = 0
    exec(compile(README_HELLO_WORLD, "hello_world", "exec"), ns)
    assert scn.forward_pass_multiplyAdd_count > 0 and scn.forward_pass_hidden_states > 0  # SCN's counters
    out = ns["output"]
    assert tuple(out.shape) == (2, 32, 10, 10)
    assert ns["inputSpatialSize"].tolist() == [87, 87]
    assert ns["input"].features.shape == (ns["locations"].shape[0], 1)
    assert torch.isfinite(out).all() and out.abs().sum() > 0
    out.sum().backward()  # trains
    assert all(p.grad is not None for p in ns["model"].parameters())
    assert "Output SparseConvNetTensor" in capsys.readouterr().out


def test_input_batch_hello_world():
    ns = {}
    exec(compile(INPUT_BATCH_HELLO_WORLD, "hello_world_input_batch", "exec"), ns)
    out = ns["output"]
    assert tuple(out.shape) == (2, 32, 10, 10)
    torch.testing.assert_close(out[0], out[1])  # both samples hold the same message
    m = ns["input"].metadata
    assert ns["input"].batch_size() == 2
    assert len(m.rulebooks) == 3 and len(m.submanifold_rulebooks) == 4  # precomputed, then reused


def test_bl_input_layer_hello_world():
    msg = [" X   X  XXX ", " XXXXX  XX  ", " X   X  XXX "]
    batch = []
    for shift in (0, 1):
        l = [[y, x + shift] for y, line in enumerate(msg) for x, c in enumerate(line) if c == "X"]
        batch.append([torch.LongTensor(l), torch.ones(len(l), 1)])
    coords, feats = scn.prepare_BLInput(batch)
    assert coords.shape[:2] == feats.shape[:2] and (coords[0, -1] == -1).all() == (len(batch[0][0]) < coords.shape[1])
    model = scn.Sequential(scn.SubmanifoldConvolution(2, 1, 4, 3, False), scn.BatchNormReLU(4),
                           scn.MaxPooling(2, 3, 2), scn.SparseToDense(2, 4))
    x = scn.BLInputLayer(2, model.input_spatial_size(torch.LongTensor([5, 7])))([coords, feats])
    assert x.batch_size() == 2 and x.features.shape[0] == sum(len(l) for l, f in batch)
    assert tuple(model(x).shape) == (2, 4, 5, 7)


# ------------------------------------------------------------------------------- duplicate modes
def _np_input_layer(coords, feats, mode, first_wins=True):
    """Reference: group rows by site in order of first appearance."""
    groups, order = {}, []
    for i, row in enumerate(map(tuple, coords)):
        if row not in groups:
            groups[row] = []
            order.append(row)
        groups[row].append(i)
    pick = {1: 0 if first_wins else -1, 2: -1 if first_wins else 0}
    rows = []
    for key in order:
        g = groups[key]
        if mode in (1, 2):
            rows.append(feats[g[pick[mode]]])
        elif mode == 3:
            rows.append(feats[g].sum(0))
        else:
            rows.append(feats[g].mean(0))
    return np.array(order), np.stack(rows), groups


def _duplicated_input(seed=0, n=300, dims=3, batch=3, size=6):
    g = np.random.default_rng(seed)
    coords = np.concatenate([g.integers(0, size, (n, dims)), g.integers(0, batch, (n, 1))], 1)
    feats = g.normal(size=(n, 4))
    return coords, feats


@pytest.mark.parametrize("mode", [1, 2, 3, 4])
def test_input_layer_modes_match_numpy(mode):
    coords, feats = _duplicated_input(mode)
    assert len(np.unique(coords, axis=0)) < len(coords)  # there are duplicates
    f = torch.from_numpy(feats).requires_grad_(True)
    x = scn.InputLayer(3, 6, mode=mode)([torch.from_numpy(coords), f])
    locs, ref, groups = _np_input_layer(coords, feats, mode)
    np.testing.assert_array_equal(x.get_spatial_locations().numpy(), locs)  # batch index in the last column
    np.testing.assert_allclose(x.features.detach().numpy(), ref)
    assert x.batch_size() == 3 and x.spatial_size.tolist() == [6, 6, 6]
    # backward: each input row gets the gradient of the row it fed (mode 4: divided by the count)
    gsite = np.random.default_rng(9).normal(size=ref.shape)
    (x.features * torch.from_numpy(gsite)).sum().backward()
    gref = np.zeros_like(feats)
    for r, key in enumerate(map(tuple, locs)):
        rows = groups[key]
        if mode == 1:
            rows = rows[:1]
        elif mode == 2:
            rows = rows[-1:]
        for i in rows:
            gref[i] = gsite[r] / (len(rows) if mode == 4 else 1)
    np.testing.assert_allclose(f.grad.numpy(), gref)


def test_input_layer_mode0_and_single_sample_coords():
    g = np.random.default_rng(1)
    flat = g.choice(64, 20, replace=False)
    coords = np.stack([flat // 8, flat % 8], 1)
    feats = torch.randn(20, 2)
    x = scn.InputLayer(2, [8, 8], mode=0)([torch.from_numpy(coords), feats])  # [N, D]: one sample
    assert x.features is feats  # mode 0 passes rows through
    np.testing.assert_array_equal(x.get_spatial_locations().numpy(), np.concatenate([coords, np.zeros((20, 1))], 1))
    dup = np.concatenate([coords, coords[:1]])
    with pytest.raises(ValueError, match="duplicate"):
        scn.InputLayer(2, 8, mode=0)([torch.from_numpy(dup), torch.randn(21, 2)])
    # batch_size is a lower bound on the number of samples
    y = scn.InputLayer(2, 8)([torch.from_numpy(coords), feats, 4])
    assert y.batch_size() == 4 and tuple(scn.SparseToDense(2, 2)(y).shape) == (4, 2, 8, 8)


@pytest.mark.parametrize("mode", [0, 1, 2, 3, 4])
def test_output_layer_round_trip(mode):
    coords, feats = _duplicated_input(10 + mode, n=200, dims=2)
    if mode == 0:
        coords = np.unique(coords, axis=0)
        feats = feats[:len(coords)]
    f = torch.from_numpy(feats).requires_grad_(True)
    x = scn.InputLayer(2, 6, mode=mode)([torch.from_numpy(coords), f])
    out = scn.OutputLayer(2)(x)
    assert out.shape == feats.shape
    locs, ref, groups = _np_input_layer(coords, feats, mode if mode else 3)
    expect = np.zeros_like(feats)
    for r, key in enumerate(map(tuple, locs)):
        rows = groups[key]
        if mode in (0, 3, 4):  # every input row gets its site's value
            expect[rows] = ref[r]
        elif mode == 1:  # only the kept row
            expect[rows[0]] = ref[r]
        else:
            expect[rows[-1]] = ref[r]
    np.testing.assert_allclose(out.detach().numpy(), expect)
    out.sum().backward()
    assert f.grad is not None and torch.isfinite(f.grad).all()
    if mode in (0, 3):  # sum then copy back: each row's gradient is the size of its group
        sizes = np.array([len(groups[tuple(c)]) for c in coords], dtype=np.float64)
        np.testing.assert_allclose(f.grad.numpy(), np.repeat(sizes[:, None], 4, 1))


@pytest.mark.parametrize("mode", [0, 1, 2, 3, 4])
def test_bl_layers_modes_and_round_trip(mode):
    g = np.random.default_rng(mode)
    b, l, size = 3, 40, 7
    if mode == 0:  # unique sites, no padding
        coords = np.stack([np.stack(np.unravel_index(g.choice(size * size, l, replace=False), (size, size)), 1)
                           for _ in range(b)])
    else:
        coords = g.integers(0, size, (b, l, 2))
        coords[0, 30:] = -1  # empty rows
    feats = g.normal(size=(b, l, 3))
    f = torch.from_numpy(feats).requires_grad_(True)
    x = scn.BLInputLayer(2, size, mode=mode)([torch.from_numpy(coords), f])
    locs, rows, expect = [], [], np.zeros_like(feats)
    for s in range(b):  # sample by sample; BLInputLayer mode 1 keeps the last row, mode 2 the first
        present = [i for i in range(l) if coords[s, i, 0] >= 0]
        c = np.concatenate([coords[s, present], np.full((len(present), 1), s)], 1)
        lo, ref, groups = _np_input_layer(c, feats[s, present], mode if mode else 3, first_wins=False)
        locs.append(lo)
        rows.append(ref)
        for r, key in enumerate(map(tuple, lo)):
            kept = {1: groups[key][-1:], 2: groups[key][:1]}.get(mode, groups[key])
            expect[s, [present[i] for i in kept]] = ref[r]
    np.testing.assert_array_equal(x.get_spatial_locations().numpy(), np.concatenate(locs))
    np.testing.assert_allclose(x.features.detach().numpy(), np.concatenate(rows))
    back = scn.BLOutputLayer(2)(x)
    np.testing.assert_allclose(back.detach().numpy(), expect)
    back.sum().backward()
    assert torch.isfinite(f.grad).all()


# --------------------------------------------------------------------------- input_spatial_size
def test_input_spatial_size_arithmetic():
    L = torch.LongTensor
    assert scn.Convolution(2, 1, 1, 3, 2, False).input_spatial_size(L([10, 4])).tolist() == [21, 9]
    assert scn.Convolution(3, 1, 1, [3, 2, 1], [2, 2, 1], False).input_spatial_size(L([4, 4, 4])).tolist() == [9, 8, 4]
    assert scn.MaxPooling(2, 2, 2).input_spatial_size(L([5, 5])).tolist() == [10, 10]
    assert scn.AveragePooling(1, 3, 1).input_spatial_size(L([5])).tolist() == [7]
    assert scn.Deconvolution(2, 1, 1, 3, 2, False).input_spatial_size(L([21, 9])).tolist() == [10, 4]
    assert scn.FullConvolution(2, 1, 1, 2, 2, False).input_spatial_size(L([8, 8])).tolist() == [4, 4]
    assert scn.UnPooling(2, 3, 2).input_spatial_size(L([21, 21])).tolist() == [10, 10]
    for m in (scn.SubmanifoldConvolution(2, 1, 1, 3, False), scn.BatchNormReLU(1), scn.ReLU(), scn.Identity(),
              scn.NetworkInNetwork(1, 1), scn.Dropout(), scn.SparseToDense(2, 1), scn.JoinTable(), scn.AddTable()):
        assert m.input_spatial_size(L([7, 9])).tolist() == [7, 9]
    with pytest.raises(ValueError, match="no input size"):
        scn.FullConvolution(2, 1, 1, 3, 2, False).input_spatial_size(L([8, 8]))
    # a whole network: the returned size gives the requested output size
    net = scn.Sequential(scn.SparseVggNet(2, 1, [['C', 4], 'MP', ['C', 4, 4], ['MP', 3, 2], 'C3/2']),
                         scn.SparseToDense(2, 8))
    size = net.input_spatial_size([3, 2])
    assert size.tolist() == [31, 23]
    x = scn.InputLayer(2, size)([torch.LongTensor([[0, 0], [30, 22], [15, 11]]), torch.ones(3, 1)])
    assert tuple(net(x).shape) == (1, 8, 3, 2)
    u = scn.UNet(3, 1, [4, 8, 12], downsample=[2, 2])
    assert u.input_spatial_size(L([8, 8, 8])).tolist() == [8, 8, 8]  # U-Nets keep the size


# ------------------------------------------------------------------------------------ bad input
def test_bad_input_errors():
    layer = scn.InputLayer(2, [8, 8])
    with pytest.raises(ValueError, match="outside spatial_size"):
        layer([torch.LongTensor([[1, 2], [8, 0]]), torch.ones(2, 1)])
    with pytest.raises(ValueError, match="negative coordinate"):
        layer([torch.LongTensor([[1, -1]]), torch.ones(1, 1)])
    with pytest.raises(ValueError, match=r"\[N, 2\] or \[N, 3\]"):
        layer([torch.LongTensor([[1, 2, 3, 0]]), torch.ones(1, 1)])  # wrong dimension
    with pytest.raises(ValueError, match="one row per coordinate"):
        layer([torch.LongTensor([[1, 2]]), torch.ones(2, 1)])
    with pytest.raises(ValueError, match="integer"):
        layer([torch.tensor([[1.0, 2.0]]), torch.ones(1, 1)])
    with pytest.raises(ValueError, match="negative batch"):
        layer([torch.LongTensor([[1, 2, -1]]), torch.ones(1, 1)])
    with pytest.raises(ValueError, match="int64"):
        scn.InputLayer(6, 2 ** 11)([torch.LongTensor([[0] * 6]), torch.ones(1, 1)])
    with pytest.raises(ValueError, match="mode must be"):
        scn.InputLayer(2, 8, mode=5)
    with pytest.raises(ValueError, match="spatial_size must be"):
        scn.InputLayer(3, [8, 8])
    x = layer([torch.LongTensor([[1, 2], [3, 4]]), torch.ones(2, 1)])
    with pytest.raises(ValueError, match="3-dimensional but the input is 2-dimensional"):
        scn.SubmanifoldConvolution(3, 1, 2, 3, False)(x)
    with pytest.raises(ValueError, match="expects 4 input feature planes"):
        scn.SubmanifoldConvolution(2, 4, 2, 3, False)(x)
    with pytest.raises(ValueError, match="divisible by the stride"):
        scn.Convolution(2, 1, 2, 3, 2, False)(x)  # (8 - 3) % 2 != 0
    with pytest.raises(ValueError, match="no sites at the output size"):
        scn.Deconvolution(2, 1, 2, 2, 2, False)(x)
    with pytest.raises(ValueError, match="no sites at the output size"):
        scn.UnPooling(2, 2, 2)(x)
    with pytest.raises(TypeError, match="SparseConvNetTensor"):
        scn.ReLU()(torch.ones(2, 1))
    with pytest.raises(ValueError, match="OutputLayer"):
        scn.OutputLayer(2)(scn.MaxPooling(2, 2, 2)(x))  # not at the input scale
    with pytest.raises(ValueError, match="duplicate"):
        scn.BLInputLayer(2, 8, mode=0)([torch.LongTensor([[[1, 1], [1, 1]]]), torch.ones(1, 2, 1)])
    with pytest.raises(ValueError, match="outside spatial_size"):
        ib = scn.InputBatch(2, [4, 4])
        ib.add_sample()
        ib.set_location(torch.LongTensor([4, 0]), torch.ones(1))
    with pytest.raises(ValueError, match="add_sample"):
        scn.InputBatch(2, [4, 4]).set_location(torch.LongTensor([1, 0]), torch.ones(1))
    with pytest.raises(ValueError, match="same sites"):
        scn.JoinTable()([x, scn.MaxPooling(2, 2, 2)(x)])
    with pytest.raises(ValueError, match="divisible by groups"):
        scn.SubmanifoldConvolution(2, 3, 4, 3, False, groups=2)


# ------------------------------------------------------------------------------------- metadata
def test_rulebooks_are_cached_per_spatial_size():
    coords = torch.LongTensor([[i % 9, (3 * i) % 9, i % 2] for i in range(30)])
    x = scn.InputLayer(2, 9)([coords, torch.randn(30, 2)])
    m = x.metadata
    a = scn.SubmanifoldConvolution(2, 2, 4, 3, False)
    b = scn.SubmanifoldConvolution(2, 4, 4, 3, False)
    y = b(a(x))
    assert len(m.submanifold_rulebooks) == 1  # one rulebook for both layers
    book = m.submanifold_rulebook(x.spatial_size, torch.LongTensor([3, 3]))
    z = scn.Convolution(2, 4, 4, 3, 2, False)(y)
    p = scn.MaxPooling(2, 3, 2)(y)  # same geometry as the convolution: same rulebook and sites
    assert len(m.rulebooks) == 1 and z.spatial_size.tolist() == p.spatial_size.tolist() == [4, 4]
    assert torch.equal(z.get_spatial_locations(), p.get_spatial_locations())
    w = scn.Deconvolution(2, 4, 4, 3, 2, False)(z)  # reuses it in reverse
    assert len(m.rulebooks) == 1 and torch.equal(w.get_spatial_locations(), x.get_spatial_locations())
    (w.features.sum() + p.features.sum()).backward()
    assert m.submanifold_rulebook(x.spatial_size, torch.LongTensor([3, 3])) is book
    assert set(m.sites) == {(9, 9), (4, 4)}
    # one set of sites per spatial size: a second map onto existing sites is aligned to their rows ...
    one = scn.InputLayer(2, 9)([torch.LongTensor([[4, 4]]), torch.ones(1, 1)])
    big = scn.MaxPooling(2, 6, 1)(one)  # 16 sites at 4x4
    small = scn.Convolution(2, 1, 1, 3, 2, False)(one)  # its 4 sites are among them: rows follow `big`
    assert big.features.shape[0] == small.features.shape[0] == 16
    assert int((small.features != 0).any(1).sum()) == 4
    # ... and sites outside the existing set are an error
    one = scn.InputLayer(2, 9)([torch.LongTensor([[4, 4]]), torch.ones(1, 1)])
    scn.Convolution(2, 1, 1, 3, 2, False)(one)
    with pytest.raises(ValueError, match="different active sites"):
        scn.MaxPooling(2, 6, 1)(one)
    with pytest.raises(ValueError, match="convert the model"):
        scn.SubmanifoldConvolution(2, 1, 1, 3, False).double()(one)
    # spconv bridge: same rows, batch first
    sp = z.to_spconv()
    assert sp.spatial_shape == [4, 4] and torch.equal(sp.indices[:, 1:].long(), z.get_spatial_locations()[:, :2])
    back = scn.SparseConvNetTensor.from_spconv(sp)
    assert torch.equal(back.get_spatial_locations(), z.get_spatial_locations())


def test_input_batch_semantics():
    ib = scn.InputBatch(2, [5, 5])
    ib.add_sample()
    ib.set_location(torch.LongTensor([1, 2]), torch.FloatTensor([1, 10]))
    ib.set_location(torch.LongTensor([1, 2]), torch.FloatTensor([2, 20]))  # kept: the site exists
    ib.set_location(torch.LongTensor([3, 3]), torch.FloatTensor([3, 30]))
    ib.set_location(torch.LongTensor([3, 3]), torch.FloatTensor([4, 40]), overwrite=True)
    ib.add_sample()
    ib.set_locations(torch.LongTensor([[1, 2], [0, 0]]), torch.FloatTensor([[5, 50], [6, 60]]))
    ib.set_locations(torch.LongTensor([[4, 4, 3]]), torch.FloatTensor([[7, 70]]))  # explicit sample index
    assert ib.features.tolist() == [[1, 10], [4, 40], [5, 50], [6, 60], [7, 70]]
    assert ib.get_spatial_locations().tolist() == [[1, 2, 0], [3, 3, 0], [1, 2, 1], [0, 0, 1], [4, 4, 3]]
    assert ib.batch_size() == 4
    dense = torch.zeros(3, 3, 2)
    dense[0, 1] = torch.tensor([0.5, 0])
    dense[2, 2] = torch.tensor([0, -2.0])
    ib.add_sample_from_tensor(dense, [3, 3], threshold=0.6)  # (3, 3) + (2, 2) falls outside 5x5
    ib.add_sample_from_tensor(dense, [0, 0], threshold=0.1)
    assert ib.get_spatial_locations()[5:].tolist() == [[0, 1, 5], [2, 2, 5]]
    out = scn.SubmanifoldConvolution(2, 2, 3, 3, False)(ib)
    assert out.features.shape == (7, 3)
    ib.precompute_metadata(2)
    m = ib.metadata  # 5x5 is odd: the 3x3 submanifold rulebook, then 2s2 stops
    assert len(m.submanifold_rulebooks) == 1 and not m.rulebooks
    ib.set_locations(torch.LongTensor([[1, 1, 6]]), torch.FloatTensor([[8, 80]]))  # adding sites drops stale books
    assert not ib.metadata.submanifold_rulebooks and ib.features.shape[0] == 8
    assert out.metadata is ib.metadata and scn.SubmanifoldConvolution(2, 2, 3, 3, False)(ib).features.shape[0] == 8


def test_batch_norm_matches_torch_with_scn_momentum():
    x = scn.InputLayer(1, 50)([torch.arange(40).view(-1, 1), torch.randn(40, 3) * 2 + 1])
    bn = scn.BatchNormalization(3, eps=1e-4, momentum=0.9)
    ref = torch.nn.BatchNorm1d(3, eps=1e-4, momentum=0.1)
    torch.testing.assert_close(bn(x).features, ref(x.features))
    torch.testing.assert_close(bn.running_mean, ref.running_mean)
    torch.testing.assert_close(bn.running_var, ref.running_var)
    bn.eval()
    ref.eval()
    torch.testing.assert_close(bn(x).features, ref(x.features))
    leaky = scn.BatchNormLeakyReLU(3, leakiness=0.2)
    torch.testing.assert_close(leaky(x).features, F.leaky_relu(ref.train()(x.features), 0.2))
    assert (scn.BatchNormReLU(3)(x).features >= 0).all()
    d = scn.Dropout(0.25).eval()
    torch.testing.assert_close(d(x).features, x.features * 0.75)  # non-inverted dropout
    bd = scn.BatchwiseDropout(0.5).train()(x).features
    assert all(bool((bd[:, c] == 0).all() or torch.equal(bd[:, c], x.features[:, c])) for c in range(3))
    for mod, fn in ((scn.ReLU(), F.relu), (scn.LeakyReLU(0.1), lambda t: F.leaky_relu(t, 0.1)), (scn.ELU(), F.elu),
                    (scn.SELU(), F.selu), (scn.Sigmoid(), torch.sigmoid), (scn.Tanh(), torch.tanh)):
        torch.testing.assert_close(mod(x).features, fn(x.features))
    # SparseConvNet checkpoints: old buffer names and weight layouts load
    sd = {"weight": torch.ones(3), "bias": torch.zeros(3), "runningMean": torch.ones(3), "runningVar": torch.ones(3)}
    bn.load_state_dict(sd)
    assert bn.running_mean.tolist() == [1, 1, 1]
    conv = scn.SubmanifoldConvolution(2, 3, 4, 3, False)
    old = torch.randn(9, 3, 4)
    conv.load_state_dict({"weight": old})
    torch.testing.assert_close(conv.weight[:, 0], old)
    conv.load_state_dict({"weight": old.reshape(27, 4)})
    torch.testing.assert_close(conv.weight[:, 0], old)


# ------------------------------------------------------------------------------------- networks
def _random_input(dimension, size, n=120, planes=3, batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    coords = torch.cat([torch.randint(0, size, (n, dimension), generator=g),
                        torch.randint(0, batch, (n, 1), generator=g)], 1)
    return scn.InputLayer(dimension, size, mode=4)([coords, torch.randn(n, planes, generator=g)])


@pytest.mark.parametrize("builder,dim,size,planes_out", [
    (lambda: scn.SparseVggNet(2, 3, [['C', 8], ['C', 8, 4], 'MP', ['C', 8, 4, 4], ['C', 8, 4, 4, 4], 'C3/2']), 2, 31,
     20),
    (lambda: scn.SparseResNet(2, 3, [['b', 8, 2, 1], ['b', 16, 2, 2], ['basic', 16, 1, 1]]), 2, 17, 16),
    (lambda: scn.Sequential(scn.SubmanifoldConvolution(3, 3, 8, 3, False),
                            scn.UNet(3, 2, [8, 16, 24], residual_blocks=True, leakiness=0.1)), 3, 16, 8),
    (lambda: scn.UNet(3, 1, [8, 16], n_input_planes=3), 3, 8, 8),
    (lambda: scn.Sequential(scn.SubmanifoldConvolution(3, 3, 8, 3, False),
                            scn.FullyConvolutionalNet(3, 1, [8, 12, 16], residual_blocks=True)), 3, 16, 36),
])
def test_network_builders_train(builder, dim, size, planes_out):
    torch.manual_seed(0)
    net = builder()
    x = _random_input(dim, size)
    out = net(x)
    assert out.features.shape[1] == planes_out
    out.features.square().mean().backward()
    grads = [p.grad for p in net.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_vgg_plus_and_unet_structure_follow_scn():
    net = scn.SparseVggNet(2, 1, [['C', 8, 4, 4]])
    table = net[0]
    assert isinstance(table, scn.ConcatTable) and len(table) == 3
    kinds = [type(m).__name__ for m in table[2]]
    assert kinds == ["Convolution", "BatchNormReLU", "SubmanifoldConvolution", "BatchNormReLU"] * 2 + \
        ["Deconvolution", "BatchNormReLU", "SubmanifoldConvolution", "BatchNormReLU", "Deconvolution"]
    u = scn.UNet(3, 1, [4, 8], residual_blocks=True)
    keys = set(u.state_dict().keys())  # Sequential/ConcatTable nesting as in SparseConvNet's UNet
    assert {"0.1.0.running_mean", "0.1.1.weight", "2.1.1.weight", "2.1.2.0.1.1.weight", "2.1.4.weight"} <= keys


def test_empty_input_and_training_step():
    x = scn.InputLayer(2, 9)([torch.zeros(0, 3, dtype=torch.long), torch.zeros(0, 2)])
    net = scn.Sequential(scn.SubmanifoldConvolution(2, 2, 4, 3, False), scn.BatchNormReLU(4),
                         scn.Convolution(2, 4, 4, 3, 2, False), scn.SparseToDense(2, 4))
    assert tuple(net(x).shape) == (1, 4, 4, 4)
    # a short training loop on a fixed batch lowers the loss
    torch.manual_seed(0)
    x = _random_input(2, 9, planes=2)
    target = torch.randn(1)
    net = scn.Sequential(scn.SubmanifoldConvolution(2, 2, 8, 3, True), scn.BatchNormReLU(8),
                         scn.AveragePooling(2, 3, 2), scn.SubmanifoldConvolution(2, 8, 1, 3, True))
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    losses = []
    for _ in range(10):
        loss = (net(x).features.mean() - target).square()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] * 0.5


# -------------------------------------------------------------------------------------- examples
def test_digits_example_quick(capsys):
    sys.path.insert(0, os.path.join(ROOT, "example"))
    try:
        import scn_digits
    finally:
        sys.path.pop(0)
    history = scn_digits.main(["--quick", "--threads", "1"])
    assert history[-1]["loss"] < history[0]["loss"]
    assert history[-1]["test_acc"] > 0.3  # chance is 0.1
    assert "final test accuracy" in capsys.readouterr().out


@pytest.mark.skipif(not os.path.exists(SCANNET), reason="ScanNet scene not found at ../shared/data "
                                                        "(scannet_scene0000_00.bin); the shared data folder is absent")
def test_unet_on_scannet_scene():
    pts = np.fromfile(SCANNET, dtype=np.float32).reshape(-1, 6)
    xyz, rgb = torch.from_numpy(pts[:, :3]), torch.from_numpy(pts[:, 3:]) / 127.5 - 1
    voxel = 0.05  # 5 cm
    coords = torch.floor((xyz - xyz.min(0).values) / voxel).long()
    size = 256
    assert int(coords.max()) < size
    torch.manual_seed(0)
    m = 8
    model = scn.Sequential().add(scn.InputLayer(3, size, mode=4)).add(
        scn.SubmanifoldConvolution(3, 3, m, 3, False)).add(
        scn.UNet(3, 1, [m, 2 * m, 3 * m], residual_blocks=False)).add(
        scn.BatchNormReLU(m)).add(scn.OutputLayer(3))
    head = torch.nn.Linear(m, 20)
    out = head(model([coords, rgb]))
    assert out.shape == (len(pts), 20)  # one prediction per point
    labels = torch.randint(0, 20, (len(pts),))
    loss = F.cross_entropy(out, labels)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    # mode 4 averaged the colours of the points sharing a voxel
    x = scn.InputLayer(3, size, mode=4)([coords, rgb])
    key = coords[:, 0] * size * size + coords[:, 1] * size + coords[:, 2]
    assert x.features.shape[0] == torch.unique(key).numel()

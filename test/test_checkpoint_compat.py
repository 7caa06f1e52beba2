"""Checkpoint compatibility with the original spconv 2.3.8.

test/data/spconv238_fixture.pt was produced by the ORIGINAL spconv 2.3.8 (CPU build, single
thread) with test/data/make_spconv238_fixture.py. It holds state_dicts, inputs and the outputs of
every layer of two small nets. Here the same nets are rebuilt with OUR ``spconv.pytorch`` (this
file must not import the original), the state_dicts are loaded with ``strict=True`` and the
outputs compared through ``.dense()`` (row order differs between implementations) plus the set of
active sites. A second test checks that ``torch.manual_seed(0); Net()`` draws the same initial
weights as spconv 2.3.8.

The fixture is committed: if it is missing the tests FAIL (no skip). Regenerate with
    OMP_NUM_THREADS=1 /tmp/spconv-ref/bin/python test/data/make_spconv238_fixture.py
"""
import os

import pytest
import torch
from torch import nn

import spconv.pytorch as spconv

FIXTURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "spconv238_fixture.pt")
ATOL = 1e-6  # outputs here are <= 0.83 in magnitude; our diffs vs spconv are ~1e-7
RTOL = 1e-5


# ---------------------------------------------------------------------------------------------
# Networks: verbatim copy of build_nets() in test/data/make_spconv238_fixture.py
# ---------------------------------------------------------------------------------------------
def build_nets(spconv):
    class Net3d(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = spconv.SparseSequential(
                spconv.SubMConv3d(4, 8, 3, bias=True, indice_key="subm1"),
                nn.ReLU(),
                spconv.SubMConv3d(8, 8, 3, bias=False, indice_key="subm1"),  # reuses 'subm1'
            )
            self.down = spconv.SparseConv3d(8, 16, 3, stride=2, padding=1, bias=False, indice_key="down1",
                                            record_voxel_count=True)
            self.conv2 = spconv.SubMConv3d(16, 8, 3, bias=True, indice_key="subm2")
            self.up_t = spconv.SparseConvTranspose3d(8, 2, 3, stride=2, bias=True)
            self.inv = spconv.SparseInverseConv3d(8, 8, 3, indice_key="down1", bias=True)

        def forward(self, x):
            a = self.conv1(x)
            b = self.down(a)
            c = self.conv2(b.replace_feature(torch.relu(b.features)))
            d = self.up_t(c)
            e = self.inv(c)
            return {"conv1": a, "down": b, "conv2": c, "up_t": d, "inv": e}

    class Net2d(nn.Module):
        def __init__(self):
            super().__init__()
            # non-square kernels / strides / dilation exercise the KRSC weight layout
            self.subm = spconv.SubMConv2d(3, 8, (3, 5), bias=True, indice_key="s2d")
            self.conv = spconv.SparseConv2d(8, 6, (2, 3), stride=(2, 1), padding=(0, 1), bias=True)
            self.conv_d = spconv.SparseConv2d(6, 4, 3, stride=1, padding=1, dilation=2, bias=False)

        def forward(self, x):
            a = self.subm(x)
            b = self.conv(a.replace_feature(torch.relu(a.features)))
            c = self.conv_d(b)
            return {"subm": a, "conv": b, "conv_d": c}

    return {"net3d": Net3d, "net2d": Net2d}


NETS = build_nets(spconv)
NET_NAMES = sorted(NETS)


@pytest.fixture(scope="module")
def fixture():
    # deliberately no skip: the fixture is part of the repository
    assert os.path.isfile(FIXTURE), f"missing committed fixture {FIXTURE}; see make_spconv238_fixture.py"
    return torch.load(FIXTURE, map_location="cpu", weights_only=True)


def _sorted_sites(x):
    idx = x.indices.long()
    key = idx[:, 0]
    for d, s in enumerate(x.spatial_shape):
        key = key * int(s) + idx[:, d + 1]
    order = torch.argsort(key)
    return idx[order], x.features[order]


def _dense_from_sites(indices, features, spatial_shape, batch_size):
    out = features.new_zeros((batch_size, *spatial_shape, features.shape[1]))
    out[tuple(indices[:, d].long() for d in range(indices.shape[1]))] = features
    return out.movedim(-1, 1).contiguous()


def _describe_site_mismatch(ours, ref):
    a = {tuple(r) for r in ours.tolist()}
    b = {tuple(r) for r in ref.tolist()}
    return (f"ours {len(a)} sites, spconv {len(b)} sites; only ours: {sorted(a - b)[:5]} "
            f"({len(a - b)}), only spconv: {sorted(b - a)[:5]} ({len(b - a)})")


def test_fixture_meta(fixture):
    meta = fixture["meta"]
    assert meta["spconv_version"] == "2.3.8"
    assert meta["num_threads"] == 1
    assert set(fixture["state"]) == set(NETS) == set(fixture["inputs"]) == set(fixture["outputs"])
    for name in NETS:
        inp = fixture["inputs"][name]
        assert inp["indices"].dtype == torch.int32 and inp["indices"].is_contiguous()
        # the reconstruction of .dense() from sorted sites is consistent with spconv's own .dense()
        for lname, rec in fixture["outputs"][name].items():
            dense = _dense_from_sites(rec["indices"], rec["features"], rec["spatial_shape"], rec["batch_size"])
            assert list(dense.shape) == rec["dense_shape"], (name, lname)
            assert abs(float(dense.double().sum()) - rec["dense_sum"]) <= 1e-6 * max(1.0, rec["dense_abs_sum"])
            assert abs(float(dense.double().abs().sum()) - rec["dense_abs_sum"]) <= 1e-6 * max(1.0, rec["dense_abs_sum"])


@pytest.mark.parametrize("name", NET_NAMES)
def test_seeded_init_matches_spconv238(fixture, name):
    torch.manual_seed(0)
    net = NETS[name]()
    ours = net.state_dict()
    ref = fixture["init_state"][name]
    assert list(ours.keys()) == list(ref.keys())
    for k in ref:
        assert ours[k].shape == ref[k].shape, (k, tuple(ours[k].shape), tuple(ref[k].shape))
        assert ours[k].dtype == ref[k].dtype, (k, ours[k].dtype, ref[k].dtype)
        torch.testing.assert_close(ours[k], ref[k], atol=1e-7, rtol=1e-6, msg=lambda m: f"{name}.{k}: {m}")


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("name", NET_NAMES)
def test_state_dict_loads_and_matches_outputs(fixture, name, mode):
    """spconv 2.3.8 ran train() (its CPU build cannot add a bias in eval); without BatchNorm,
    eval() must give the same numbers, so both modes are compared to the same reference."""
    torch.manual_seed(12345)  # different init, so only the loaded weights can make this pass
    net = NETS[name]()
    state = {k: v.clone() for k, v in fixture["state"][name].items()}
    voxel_buffers = [k for k in state if k.endswith("max_num_voxels_during_training")]
    for k in voxel_buffers:  # start from 0; the forward must raise it to spconv's value again
        state[k].zero_()
    net.load_state_dict(state, strict=True)
    for k, v in net.state_dict().items():
        assert torch.equal(v, state[k]), k
    net.train(mode == "train")

    inp = fixture["inputs"][name]
    x = spconv.SparseConvTensor(inp["features"], inp["indices"], inp["spatial_shape"], inp["batch_size"])
    with torch.no_grad():
        outs = net(x)

    assert set(outs) == set(fixture["outputs"][name])
    failures = []
    for lname, rec in fixture["outputs"][name].items():
        out = outs[lname]
        assert [int(s) for s in out.spatial_shape] == rec["spatial_shape"], (lname, out.spatial_shape)
        assert int(out.batch_size) == rec["batch_size"], lname
        ours_idx, _ = _sorted_sites(out)
        ref_idx = rec["indices"].long()
        if ours_idx.shape != ref_idx.shape or not torch.equal(ours_idx, ref_idx):
            failures.append(f"{name}.{lname} active sites differ: {_describe_site_mismatch(ours_idx, ref_idx)}")
        ours_dense = out.dense()
        ref_dense = _dense_from_sites(rec["indices"], rec["features"], rec["spatial_shape"], rec["batch_size"])
        assert list(ours_dense.shape) == rec["dense_shape"], (lname, tuple(ours_dense.shape))
        if not torch.allclose(ours_dense, ref_dense, atol=ATOL, rtol=RTOL):
            err = (ours_dense - ref_dense).abs()
            failures.append(f"{name}.{lname} dense outputs differ: max abs err {float(err.max()):.3g}, "
                            f"{int((err > ATOL + RTOL * ref_dense.abs()).sum())}/{err.numel()} elements off")
    assert not failures, "\n".join(failures)

    # record_voxel_count buffer updated like spconv's (max of number of output sites)
    for k in voxel_buffers:
        assert torch.equal(net.state_dict()[k], fixture["state"][name][k]), (k, net.state_dict()[k])

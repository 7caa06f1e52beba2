"""Downstream code patterns against the ORIGINAL spconv 2.3.8.

test/data/spconv238_clients.pt was made once by spconv 2.3.8 (CPU, one thread) with
test/data/make_spconv238_clients.py from the networks in test/client_nets.py: an mmdetection3d-style
encoder on ``torch.randint`` coordinates (repeated sites), a VoxelNeXt-style head (``replace_feature``
with more rows, then ``x.indices = torch.cat(...)``, in-place index scaling, 3D -> BEV), a net with
max pools after convs (negative features) and single layers on repeated sites. Here the same code runs
on this package with the same weights and inputs; every returned tensor must match spconv 2.3.8's.

Rows are compared in spconv's order where the sites are the same rows (SubM outputs, inverse convs,
repeated sites), else after sorting the (then unique) sites. The fixture is committed: a missing file is
a failure, not a skip.
"""
import os
import warnings

import pytest
import torch

import spconv.pytorch as spconv
from spconv import constants

import client_nets

FIXTURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "spconv238_clients.pt")


@pytest.fixture(scope="module")
def fixture():
    return torch.load(FIXTURE)


def _keys(indices, bases):
    """Row-major key of each row; ``bases`` bound each column (code may scale indices past spatial_shape)."""
    key = torch.zeros(indices.shape[0], dtype=torch.long)
    for d, base in enumerate(bases):
        key = key * int(base) + indices[:, d].long()
    return key


def assert_same_output(got, want, what):
    if "dense" in want:
        assert isinstance(got, torch.Tensor), what
        ref = want["dense"]
        assert got.shape == ref.shape, what
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4 * (1 + float(ref.abs().max())), msg=what)
        return
    assert list(got.spatial_shape) == want["spatial_shape"], what
    assert got.batch_size == want["batch_size"], what
    gi, gf = got.indices, got.features.detach()
    wi, wf = want["indices"], want["features"]
    assert gi.shape == wi.shape and gf.shape == wf.shape, f"{what}: {tuple(gf.shape)} vs spconv {tuple(wf.shape)}"
    if not torch.equal(gi, wi):  # another row order: compare the rows sorted by (site, first feature)
        bases = (torch.maximum(gi.amax(0), wi.amax(0)) + 1).tolist()
        gk, wk = _keys(gi, bases), _keys(wi, bases)

        def order(keys, feats):
            by_feature = torch.argsort(feats[:, 0], stable=True)
            return by_feature[torch.argsort(keys[by_feature], stable=True)]

        go, wo = order(gk, gf), order(wk, wf)
        assert torch.equal(gk[go], wk[wo]), f"{what}: active sites differ from spconv 2.3.8"
        gf, wf = gf[go], wf[wo]
    torch.testing.assert_close(gf, wf, rtol=1e-4, atol=1e-4 * (1 + float(wf.abs().max())), msg=what)


NETS = {
    "mmdet3d_encoder": client_nets.build_mmdet3d_style_encoder,
    "voxelnext_head": client_nets.build_voxelnext_style_head,
    "pool_after_conv": client_nets.build_pool_after_conv_net,
}


@pytest.mark.parametrize("name", list(NETS))
def test_network_matches_spconv238(fixture, name):
    rec = fixture["nets"][name]
    net = NETS[name](spconv)()
    net.load_state_dict(rec["state"])
    net.train()
    x = spconv.SparseConvTensor(rec["features"].clone(), rec["indices"].clone(), rec["spatial_shape"],
                                rec["batch_size"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the once-per-process duplicate warning has its own test
        with torch.no_grad():
            outs = net(x)
    assert set(outs) == set(rec["outputs"])
    for key, want in rec["outputs"].items():
        assert_same_output(outs[key], want, f"{name}.{key}")
    # the caller's tensors are untouched
    assert torch.equal(x.indices, rec["indices"]) and torch.equal(x.features, rec["features"])


@pytest.mark.parametrize("name", list(client_nets.duplicate_site_calls(spconv)))
def test_duplicate_sites_match_spconv238(fixture, name):
    rec = fixture["calls"][name]
    factory, _ = client_nets.duplicate_site_calls(spconv)[name]
    layer = factory()
    layer.load_state_dict(rec["state"])
    x = spconv.SparseConvTensor(rec["features"].clone(), rec["indices"].clone(), rec["spatial_shape"],
                                rec["batch_size"])
    assert torch.unique(rec["indices"], dim=0).shape[0] < rec["indices"].shape[0], "input must repeat sites"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torch.no_grad():
            out = layer(x)
    assert_same_output(out, rec["output"], name)


def _dup_grad_case(layer_factory, n=120, seed=5):
    feats, inds = client_nets.random_coords(seed, n, 2, [5, 6, 5], 3)
    feats = feats.double().requires_grad_()
    layer = layer_factory().double()
    return layer, feats, inds


@pytest.mark.parametrize("kind", ["subm", "strided", "inverse", "maxpool", "avgpool"])
def test_duplicate_sites_gradcheck(kind):
    """Backward of the duplicate-site paths is the derivative of their forward (fp64 gradcheck)."""
    factories = {
        "subm": lambda: spconv.SubMConv3d(3, 2, 3, bias=False),
        "strided": lambda: spconv.SparseConv3d(3, 2, 3, stride=2, padding=1, bias=False),
        "inverse": lambda: spconv.SparseSequential(
            spconv.SparseConv3d(3, 2, 3, stride=2, padding=1, bias=False, indice_key="d"),
            spconv.SparseInverseConv3d(2, 2, 3, indice_key="d", bias=False)),
        "maxpool": lambda: spconv.SparseMaxPool3d(2, 2),
        "avgpool": lambda: spconv.SparseAvgPool3d(2, 2),
    }
    layer, feats, inds = _dup_grad_case(factories[kind])
    if kind == "maxpool":  # distinct values, away from 0 and from each other, so max is differentiable
        with torch.no_grad():
            feats.copy_(torch.randperm(feats.numel(), generator=torch.Generator().manual_seed(0))
                        .view_as(feats).double() / 7 + 1)

    def fn(f):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return layer(spconv.SparseConvTensor(f, inds, [5, 6, 5], 2)).features

    assert torch.autograd.gradcheck(fn, (feats,), eps=1e-6, atol=1e-6)


def test_duplicates_warn_once_and_strict_mode_raises(monkeypatch):
    import spconv.pytorch.core as core
    feats, inds = client_nets.random_coords(7, 200, 1, [4, 4, 4], 2)
    conv = spconv.SubMConv3d(2, 2, 3)
    monkeypatch.setattr(core, "_warned_duplicates", False)
    with pytest.warns(UserWarning, match="duplicate sites"):
        conv(spconv.SparseConvTensor(feats, inds, [4, 4, 4], 1))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second call must not warn again
        conv(spconv.SparseConvTensor(feats, inds, [4, 4, 4], 1))
        spconv.SparseConvTensor(feats, inds, [4, 4, 4], 1).dense()
    monkeypatch.setattr(constants, "SPCONV_STRICT_INDICES", True)
    for call in (lambda x: conv(x), lambda x: spconv.SparseConv3d(2, 2, 3, 2)(x), lambda x: x.dense(),
                 lambda x: spconv.SparseMaxPool3d(2, 2)(x)):
        with pytest.raises(ValueError, match="SPCONV_STRICT_INDICES"):
            call(spconv.SparseConvTensor(feats, inds, [4, 4, 4], 1))

"""Build test/data/spconv238_fixture.pt with the ORIGINAL spconv 2.3.8 (CPU build).

Run with the reference interpreter, single-threaded (spconv 2.3.8's CPU kernels give wrong
values with more than one thread):

    OMP_NUM_THREADS=1 /tmp/spconv-ref/bin/python test/data/make_spconv238_fixture.py

Only the public ``spconv.pytorch`` API is used. The networks below are duplicated verbatim in
test/test_checkpoint_compat.py (which must not import the original spconv); keep them in sync.

Fixture contents (all CPU tensors):
  meta            versions, thread count, notes
  init_state      {net: state_dict right after ``torch.manual_seed(0); Net()``}
                  -> checks that our init draws the same numbers as spconv for the same seed
  state           {net: state_dict used for the outputs}. = init weights + seeded noise (so
                  that "load + forward" is not satisfied by the init alone) + the
                  ``max_num_voxels_during_training`` buffer after the forward pass
  inputs          {net: dict(features, indices (int32, batch in col 0, contiguous),
                        spatial_shape, batch_size)}
  outputs         {net: {layer: dict(indices (uint8), features, spatial_shape, batch_size)}}
                  Every row of ``x.dense()`` that is an active site, sorted by linearised
                  (b, *spatial) coordinate: a lossless, row-order-free form of ``.dense()``
                  that also records the active set. (Full dense arrays would be ~0.5 MB.)
                  ``dense_sum`` / ``dense_abs_sum`` / ``dense_shape`` of the real ``.dense()``
                  are stored as a cross-check of the reconstruction.

Layers run in train() mode, forward only (spconv 2.3.8 on CPU cannot add a bias in eval mode
and cannot run backward). There is no BatchNorm, so train() changes nothing numerically.
No 1x1 kernels (spconv's 1x1 fast path reinterprets the weight memory, issue #450).
"""
import os
import sys

import torch
from torch import nn

import spconv
import spconv.pytorch as spconv_pt

spconv_ns = spconv_pt  # the networks below refer to ``spconv.*`` as in user code
OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "spconv238_fixture.pt")


# ---------------------------------------------------------------------------------------------
# Networks (identical copy in test/test_checkpoint_compat.py)
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


INPUT_SPECS = {
    # name: (spatial_shape, batch_size, sites per batch, channels, data seed)
    "net3d": ([12, 14, 10], 2, [160, 140], 4, 1234),
    "net2d": ([16, 20], 2, [70, 60], 3, 4321),
}


def make_input(spatial_shape, batch_size, counts, channels, seed):
    g = torch.Generator().manual_seed(seed)
    volume = 1
    for s in spatial_shape:
        volume *= s
    rows = []
    for b in range(batch_size):
        flat = torch.randperm(volume, generator=g)[:counts[b]]
        coords = []
        rem = flat
        for s in reversed(spatial_shape):
            coords.append(rem % s)
            rem = rem // s
        coords = torch.stack(coords[::-1], 1)
        rows.append(torch.cat([torch.full((counts[b], 1), b, dtype=torch.long), coords], 1))
    indices = torch.cat(rows).to(torch.int32).contiguous()
    features = (torch.rand(indices.shape[0], channels, generator=g) * 2 - 1).contiguous()
    return features, indices


def sorted_sites(x):
    """(indices, features) of a SparseConvTensor sorted by linearised (b, *spatial)."""
    idx = x.indices.long()
    key = idx[:, 0]
    for d, s in enumerate(x.spatial_shape):
        key = key * int(s) + idx[:, d + 1]
    order = torch.argsort(key)
    assert torch.unique(key).numel() == key.numel(), "duplicate output sites"
    inds = x.indices[order]
    # stored as uint8 to keep the fixture small (all coordinates and batch ids here are < 256)
    assert int(inds.min()) >= 0 and int(inds.max()) < 256
    return inds.to(torch.uint8).contiguous(), x.features[order].detach().contiguous()


def perturbed(state, seed):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in state.items():
        if v.is_floating_point():
            out[k] = (v + 0.05 * torch.randn(v.shape, generator=g)).contiguous()
        else:
            out[k] = v.clone()
    return out


def main():
    assert torch.get_num_threads() == 1, "run with OMP_NUM_THREADS=1 (spconv 2.3.8 CPU is wrong multi-threaded)"
    assert spconv.__version__ == "2.3.8", spconv.__version__
    nets = build_nets(spconv_ns)
    fixture = {
        "meta": {
            "spconv_version": str(spconv.__version__),
            "torch_version": str(torch.__version__),
            "num_threads": torch.get_num_threads(),
            "python": sys.version.split()[0],
            "note": "outputs: active rows of .dense(), sorted by linearised (b,*spatial); train() forward",
        },
        "init_state": {}, "state": {}, "inputs": {}, "outputs": {},
    }
    for i, (name, cls) in enumerate(nets.items()):
        torch.manual_seed(0)
        net = cls()
        init_state = {k: v.detach().clone() for k, v in net.state_dict().items()}
        fixture["init_state"][name] = init_state
        net.load_state_dict(perturbed(init_state, 100 + i), strict=True)
        net.train()

        shape, bs, counts, ch, seed = INPUT_SPECS[name]
        feats, inds = make_input(shape, bs, counts, ch, seed)
        fixture["inputs"][name] = {"features": feats, "indices": inds, "spatial_shape": list(shape),
                                   "batch_size": bs}
        x = spconv_ns.SparseConvTensor(feats, inds, shape, bs)
        with torch.no_grad():
            outs = net(x)
        fixture["outputs"][name] = {}
        for lname, t in outs.items():
            oi, of = sorted_sites(t)
            dense = t.dense()
            fixture["outputs"][name][lname] = {
                "indices": oi, "features": of, "spatial_shape": [int(s) for s in t.spatial_shape],
                "batch_size": int(t.batch_size), "dense_shape": list(dense.shape),
                "dense_sum": float(dense.double().sum()), "dense_abs_sum": float(dense.double().abs().sum()),
            }
            print(f"{name}.{lname}: {tuple(of.shape)} rows, spatial {t.spatial_shape}, dense {tuple(dense.shape)}")
        # state after the forward (includes the updated max_num_voxels_during_training buffer)
        fixture["state"][name] = {k: v.detach().clone() for k, v in net.state_dict().items()}
    torch.save(fixture, OUT)
    print("wrote", OUT, os.path.getsize(OUT), "bytes")


if __name__ == "__main__":
    main()

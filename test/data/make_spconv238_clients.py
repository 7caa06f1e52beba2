"""Build test/data/spconv238_clients.pt with the ORIGINAL spconv 2.3.8 (CPU build), single-threaded:

    OMP_NUM_THREADS=1 /tmp/spconv-ref/bin/python test/data/make_spconv238_clients.py

(/tmp/spconv-ref comes from ../shared/tools/reference-venv.sh.) It runs the downstream-style networks
and calls of test/client_nets.py (seeded weights, train() forward, no backward: spconv 2.3.8 cannot run
backward on a CPU-only torch) and stores, for each, the weights, the input and every returned tensor:
``indices``/``features`` of sparse outputs in the row order spconv returned, dense outputs as they are.
test/test_client_patterns.py replays them on this package.
"""
import os
import sys

import torch

import spconv
import spconv.pytorch as spconv_pt

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
import client_nets  # noqa: E402

OUT = os.path.join(HERE, "spconv238_clients.pt")

NETS = {
    # name: (builder, (spatial_shape, batch_size, n, channels, seed))
    "mmdet3d_encoder": (client_nets.build_mmdet3d_style_encoder, ([21, 20, 16], 2, 1500, 4, 1)),
    "voxelnext_head": (client_nets.build_voxelnext_style_head, ([9, 24, 20], 2, 900, 8, 2)),
    "pool_after_conv": (client_nets.build_pool_after_conv_net, ([10, 12, 11], 2, 400, 3, 3)),
}


def record(out):
    if isinstance(out, torch.Tensor):
        return {"dense": out.detach().clone()}
    return {"indices": out.indices.clone(), "features": out.features.detach().clone(),
            "spatial_shape": [int(s) for s in out.spatial_shape], "batch_size": int(out.batch_size)}


def seeded_state(module, seed):
    """Weights drawn from a generator (independent of either library's init)."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for k, v in module.state_dict().items():
        if v.is_floating_point():
            state[k] = (torch.rand(v.shape, generator=g) - 0.5) * (2.0 if "weight" in k else 0.2)
            if k.endswith("running_var"):
                state[k] = state[k].abs() + 0.5
        else:
            state[k] = v.clone()
    return state


def main():
    assert torch.get_num_threads() == 1, "run with OMP_NUM_THREADS=1 (spconv 2.3.8 CPU is wrong multi-threaded)"
    assert spconv.__version__ == "2.3.8", spconv.__version__
    fixture = {"meta": {"spconv_version": str(spconv.__version__), "torch_version": str(torch.__version__),
                        "num_threads": torch.get_num_threads()}, "nets": {}, "calls": {}}
    for i, (name, (builder, spec)) in enumerate(NETS.items()):
        shape, bs, n, ch, seed = spec
        net = builder(spconv_pt)()
        state = seeded_state(net, 100 + i)
        net.load_state_dict(state)
        net.train()
        feats, inds = client_nets.random_coords(seed, n, bs, shape, ch)
        with torch.no_grad():
            outs = net(spconv_pt.SparseConvTensor(feats.clone(), inds.clone(), shape, bs))
        fixture["nets"][name] = {"state": state, "features": feats, "indices": inds, "spatial_shape": shape,
                                 "batch_size": bs, "outputs": {k: record(v) for k, v in outs.items()}}
        print(name, {k: tuple(v.features.shape if hasattr(v, "features") else v.shape) for k, v in outs.items()})
    for i, (name, (factory, spec)) in enumerate(client_nets.duplicate_site_calls(spconv_pt).items()):
        shape, bs, n, ch, seed = spec
        layer = factory()
        state = seeded_state(layer, 200 + i)
        layer.load_state_dict(state)
        feats, inds = client_nets.random_coords(seed, n, bs, shape, ch)
        with torch.no_grad():
            out = layer(spconv_pt.SparseConvTensor(feats.clone(), inds.clone(), shape, bs))
        fixture["calls"][name] = {"state": state, "features": feats, "indices": inds, "spatial_shape": shape,
                                  "batch_size": bs, "output": record(out)}
        print(name, tuple(out.shape if isinstance(out, torch.Tensor) else out.features.shape))
    torch.save(fixture, OUT)
    print("wrote", OUT, os.path.getsize(OUT), "bytes")


if __name__ == "__main__":
    main()

"""Data-parallel training of the sparse U-Net: 2 processes, DistributedDataParallel on gloo (CPU).

The ScanNet room (../shared/data/scannet_scene0000_00.bin, a generated room when absent) is cut into
two halves along x; each half is one sample. Two processes (torch.multiprocessing.spawn, backend
gloo on 127.0.0.1) each train on one half with DistributedDataParallel, which averages the
gradients. The model is segmentation_scannet.SparseUNet without BatchNorm (norm=False): with
BatchNorm each process would normalise with the statistics of its own half, and the gradients would
depend on how the batch is split (PyTorch's SyncBatchNorm refuses CPU tensors).

Checks, printed at the end:
- gradients: rank 0's averaged gradients of step 1 against one process computing the gradients of
  the combined batch (both halves in one SparseConvTensor, batch_size 2, same initial weights). The
  loss is the mean over samples of each sample's mean voxel loss, so both are the same quantity;
  the largest relative difference (||g_ddp - g_single|| / ||g_single|| per parameter) must be below
  1e-5 (fp32 sums in a different order).
- replicas: the parameters of both ranks are bitwise equal after the last step.
Writes ddp_train_loss.png (the loss of each rank's half and their mean) into --out.

usage: python example/ddp_train.py [--steps N] [--quick] [--out DIR]
"""
import argparse
import os
import socket
import sys
import tempfile
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel as DDP

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import DEFAULT_DATA, DEFAULT_OUT, log, out_dir, progress, pyplot  # noqa: E402
from segmentation_scannet import CLASSES, Sample, SparseUNet, make_batch, miou, per_sample_loss, prepare  # noqa: E402

WORLD_SIZE = 2


def split_halves(points: np.ndarray, labels: np.ndarray, voxel_size: float):
    """Two samples: the points left and right of the median x."""
    cut = np.median(points[:, 0])
    left = points[:, 0] < cut
    return [Sample(points[m], labels[m], voxel_size) for m in (left, ~left)]


def build_model(in_channels: int, width: int, seed: int) -> SparseUNet:
    torch.manual_seed(seed)
    return SparseUNet(in_channels, len(CLASSES), width, norm=False)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker(rank, port, samples, shape, init_state, width, steps, lr, result_dir):
    """One DDP process: trains on samples[rank]; rank 0 saves its step-1 gradients; every rank saves its
    final parameters and losses."""
    torch.set_num_threads(1)  # two processes on two cores
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD_SIZE)
    try:
        model = build_model(samples[rank].features.shape[1], width, 0)
        model.load_state_dict(init_state)
        ddp = DDP(model)
        opt = torch.optim.Adam(ddp.parameters(), lr=lr)
        x, y, batch = make_batch([samples[rank]], shape)
        losses = []
        bar = progress(range(steps), desc="DDP training (rank 0)", unit="step", disable=rank != 0 or None)
        for step in bar:
            loss = per_sample_loss(ddp(x), y, batch, 1)
            opt.zero_grad()
            loss.backward()  # DDP all-reduces (averages) the gradients here
            if step == 0 and rank == 0:
                torch.save({n: p.grad.clone() for n, p in model.named_parameters()},
                           os.path.join(result_dir, "grads_step1.pt"))
            opt.step()
            both = loss.detach().clone().unsqueeze(0)
            gathered = [torch.zeros_like(both) for _ in range(WORLD_SIZE)]
            dist.all_gather(gathered, both)
            losses.append([float(t) for t in gathered])
            if rank == 0 and hasattr(bar, "set_postfix"):
                bar.set_postfix(loss=f"{np.mean(losses[-1]):.4f}")
        torch.save({"state": model.state_dict(), "losses": losses},
                   os.path.join(result_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def single_process_grads(samples, shape, init_state, width):
    """Gradients of the combined batch (both samples in one tensor) computed in this process."""
    model = build_model(samples[0].features.shape[1], width, 0)
    model.load_state_dict(init_state)
    x, y, batch = make_batch(samples, shape)
    loss = per_sample_loss(model(x), y, batch, len(samples))
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}, loss.item()


def compare_grads(ddp_grads, ref_grads):
    """Largest per-parameter relative difference ||a - b|| / ||b||, and the parameter it occurs at."""
    worst, where = 0.0, None
    for name, ref in ref_grads.items():
        rel = float((ddp_grads[name] - ref).norm() / ref.norm().clamp(min=1e-30))
        if rel > worst:
            worst, where = rel, name
    return worst, where


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=DEFAULT_DATA, help="folder with scannet_scene0000_00.bin (default ../shared/data)")
    ap.add_argument("--out", default=DEFAULT_OUT, help="folder for the PNG (default example/output)")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--voxel-size", type=float, default=0.05)
    ap.add_argument("--width", type=int, default=16)
    ap.add_argument("--quick", action="store_true", help="10 cm voxels, 8k points, width 8, <= 10 steps")
    args = ap.parse_args(argv)
    out = out_dir(args.out)
    steps, voxel_size, width, max_points = args.steps, args.voxel_size, args.width, 0
    if args.quick:
        steps, voxel_size, width, max_points = min(steps, 10), 0.1, 8, 8000

    points, labels, source, method = prepare(args.data, voxel_size, max_points)
    samples = split_halves(points, labels, voxel_size)
    shape = [max(s.spatial_shape[d] for s in samples) for d in range(3)]
    print(f"input: {source}, {len(points)} points; normals: {method}")
    print(f"samples: left half {len(samples[0].coords)} voxels, right half {len(samples[1].coords)} voxels, "
          f"grid {shape} (z, y, x); {WORLD_SIZE} processes, gloo backend, 1 thread each")
    init_state = build_model(samples[0].features.shape[1], width, 0).state_dict()

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        mp.spawn(worker, args=(_free_port(), samples, shape, init_state, width, steps, args.lr, tmp),
                 nprocs=WORLD_SIZE, join=True)
        ddp_time = time.perf_counter() - t0
        ddp_grads = torch.load(os.path.join(tmp, "grads_step1.pt"))
        ranks = [torch.load(os.path.join(tmp, f"rank{r}.pt")) for r in range(WORLD_SIZE)]
    losses = np.array(ranks[0]["losses"])  # [steps, world]
    log(f"DDP: {steps} steps in {ddp_time:.1f} s (incl. process start); mean loss {losses[0].mean():.4f} -> "
        f"{losses[-1].mean():.4f}")

    ref_grads, ref_loss = single_process_grads(samples, shape, init_state, width)
    rel, where = compare_grads(ddp_grads, ref_grads)
    print(f"step-1 gradients, DDP (2 x 1 sample) vs one process (batch of 2): max relative difference "
          f"{rel:.2e} (at {where}); loss {losses[0].mean():.6f} vs {ref_loss:.6f}")
    replicas_equal = all(torch.equal(ranks[0]["state"][k], ranks[1]["state"][k]) for k in ranks[0]["state"])
    print(f"parameters of rank 0 and rank 1 after {steps} steps: {'bitwise equal' if replicas_equal else 'DIFFER'}")

    model = build_model(samples[0].features.shape[1], width, 0)
    model.load_state_dict(ranks[0]["state"])
    model.eval()
    with torch.no_grad():
        x, y, _ = make_batch(samples, shape)
        m, ious = miou(model(x).argmax(1), y)
    print(f"mIoU of the trained model on both halves: {m:.3f} ("
          + ", ".join(f"{c} {iou:.3f}" for c, iou in zip(CLASSES, ious)) + ")")

    plt = pyplot()
    png = os.path.join(out, "ddp_train_loss.png")
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for r in range(WORLD_SIZE):
        ax.plot(losses[:, r], lw=1, label=f"rank {r} ({'left' if r == 0 else 'right'} half)")
    ax.plot(losses.mean(1), lw=2, color="black", label="mean (the DDP objective)")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy")
    ax.set_title(f"DDP, 2 processes; grad rel. diff vs 1 process {rel:.1e}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
    print(f"wrote {png}")
    return {"grad_rel_diff": rel, "grad_rel_diff_at": where, "replicas_equal": replicas_equal,
            "losses": losses, "ref_loss": ref_loss, "miou": m, "png": png}


if __name__ == "__main__":
    main()

"""Semantic segmentation of a ScanNet room with a sparse U-Net, trained on the CPU.

Reads ../shared/data/scannet_scene0000_00.bin (N x 6 float32: x, y, z, r, g, b; a generated room when
the folder is absent), estimates normals with open3d (a numpy PCA over scikit-learn neighbours when
open3d is missing) and derives a 3-class target from height and normals:
  floor  upward normal (|n_z| > 0.85) within 15 cm of the floor height (2nd percentile of z)
  wall   vertical normal (|n_z| < 0.3) in a 20 cm x 20 cm column whose vertical surfaces span more
         than 1.5 m (tall surfaces: walls, doors, wardrobes)
  other  everything else (furniture, objects, ceiling fixtures, noise)
The points are voxelised with PointToVoxel (5 cm), each voxel's target is the majority of its points,
and a sparse U-Net (SubMConv3d blocks; SparseConv3d k=2 s=2 downsampling and SparseInverseConv3d
upsampling through shared indice_keys; skip connections by concatenation) is trained with Adam on
the room except its last quarter along x (--holdout 0.25), which is voxelised and evaluated apart,
with random flips and quarter turns of the grid at every step (--no-augment to switch them off).
Prints the loss and the voxel mIoU of both regions; writes into --out (default example/output/):
  segmentation_loss.png     training loss per step
  segmentation_topdown.png  the room from above: target vs prediction (per point, via
                            gather_features_by_pc_voxel_id), the held-out strip marked

usage: python example/segmentation_scannet.py [--steps N] [--amp] [--quick] [--holdout F] [--out DIR]
--amp runs the forward pass under torch.autocast("cpu", dtype=torch.bfloat16) (CUDA: float16 with
a GradScaler, when the model runs on a GPU).
"""
import argparse
import contextlib
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import spconv.pytorch as spconv  # noqa: E402
from spconv.pytorch.utils import PointToVoxel, gather_features_by_pc_voxel_id  # noqa: E402

from _common import DEFAULT_DATA, DEFAULT_OUT, load_scannet, log, out_dir, progress, pyplot  # noqa: E402

CLASSES = ("floor", "wall", "other")
CLASS_COLORS = np.array([[0.80, 0.65, 0.35], [0.35, 0.55, 0.85], [0.85, 0.30, 0.30]])


# --------------------------------------------------------------------------------------------------
# target derived from the scene

def estimate_normals(xyz: np.ndarray, radius: float = 0.1, max_nn: int = 30):
    """(unit normals N x 3, method): open3d's estimate_normals (hybrid radius/kNN search), or a PCA of the
    30 nearest neighbours with scikit-learn when open3d cannot be imported."""
    try:
        import open3d as o3d
    except Exception as e:  # ImportError, or OSError when libusb-1.0.so.0 is missing
        from sklearn.neighbors import NearestNeighbors
        nn_idx = NearestNeighbors(n_neighbors=max_nn).fit(xyz).kneighbors(xyz, return_distance=False)
        nbrs = xyz[nn_idx] - xyz[nn_idx].mean(1, keepdims=True)
        cov = np.einsum("nki,nkj->nij", nbrs, nbrs)
        normals = np.linalg.eigh(cov)[1][:, :, 0]  # eigenvector of the smallest eigenvalue
        return normals, f"PCA of {max_nn} nearest neighbours (open3d unavailable: {type(e).__name__})"
    pcd = o3d.geometry.PointCloud(o3d.utility.Vector3dVector(xyz.astype(np.float64)))
    pcd.estimate_normals(o3d.geometry.KDTreeSearchParamHybrid(radius=radius, max_nn=max_nn))
    return np.asarray(pcd.normals), f"open3d {o3d.__version__} estimate_normals (radius {radius} m, max_nn {max_nn})"


def derive_labels(xyz: np.ndarray, normals: np.ndarray) -> np.ndarray:
    """Per-point class 0 floor / 1 wall / 2 other (see the module docstring)."""
    nz = np.abs(normals[:, 2])
    floor_z = np.percentile(xyz[:, 2], 2)
    labels = np.full(len(xyz), 2, dtype=np.int64)
    labels[(nz > 0.85) & (xyz[:, 2] < floor_z + 0.15)] = 0
    vertical = nz < 0.3
    cell = np.floor(xyz[:, :2] / 0.2).astype(np.int64)
    cell_id = np.unique(cell, axis=0, return_inverse=True)[1].reshape(-1)
    n_cells = cell_id.max() + 1
    zmin = np.full(n_cells, np.inf)
    zmax = np.full(n_cells, -np.inf)
    np.minimum.at(zmin, cell_id[vertical], xyz[vertical, 2])
    np.maximum.at(zmax, cell_id[vertical], xyz[vertical, 2])
    tall = (zmax - zmin) > 1.5
    labels[vertical & tall[cell_id]] = 1
    return labels


# --------------------------------------------------------------------------------------------------
# data -> sparse tensors

class Sample:
    """One voxelised scene: features [M, 8], indices [M, 3] (z, y, x), voxel targets [M], per-point
    voxel ids [N] and per-point targets [N]."""

    def __init__(self, points: np.ndarray, labels: np.ndarray, voxel_size: float):
        xyz = points[:, :3]
        lo = xyz.min(0) - 1e-3
        extent = xyz.max(0) - lo + voxel_size
        grid = np.ceil(extent / voxel_size).astype(int)
        hi = lo + grid * voxel_size
        gen = PointToVoxel(vsize_xyz=[voxel_size] * 3, coors_range_xyz=[*lo.tolist(), *hi.tolist()],
                           num_point_features=6, max_num_voxels=len(points), max_num_points_per_voxel=8)
        pc = torch.from_numpy(np.ascontiguousarray(points, dtype=np.float32))
        voxels, coords, counts, pc_voxel_id = gen.generate_voxel_with_id(pc)
        mean = voxels.sum(1) / counts.clamp(min=1).unsqueeze(1).float()
        # translation-invariant features: height above the floor, the points' mean offset from the voxel
        # centre (in voxels), colour, point count. No absolute x, y: the net must not memorise positions.
        centre = torch.from_numpy(lo.astype(np.float32)) + (coords.flip(1).float() + 0.5) * voxel_size
        feats = torch.cat([mean[:, 2:3] - float(np.percentile(xyz[:, 2], 2)), (mean[:, :3] - centre) / voxel_size,
                           mean[:, 3:6] / 127.5 - 1.0, counts.float().unsqueeze(1) / 8.0], 1)
        lab = torch.from_numpy(labels)
        valid = pc_voxel_id >= 0
        votes = torch.zeros(len(coords), len(CLASSES), dtype=torch.long)
        votes.index_put_((pc_voxel_id[valid], lab[valid]), torch.ones(int(valid.sum()), dtype=torch.long),
                         accumulate=True)
        self.features = feats
        self.coords = coords
        self.spatial_shape = gen.grid_size  # z, y, x
        self.voxel_labels = votes.argmax(1)
        self.pc_voxel_id = pc_voxel_id
        self.point_labels = lab
        self.points = points
        self.voxel_size = voxel_size


def make_batch(samples, spatial_shape=None):
    """Stack samples into one SparseConvTensor (batch index = position in the list); returns
    (tensor, voxel targets [M], batch index of each voxel [M])."""
    shape = spatial_shape or [max(s.spatial_shape[d] for s in samples) for d in range(3)]
    indices = torch.cat([torch.cat([torch.full((len(s.coords), 1), b, dtype=torch.int32), s.coords], 1)
                         for b, s in enumerate(samples)])
    feats = torch.cat([s.features for s in samples])
    labels = torch.cat([s.voxel_labels for s in samples])
    return spconv.SparseConvTensor(feats, indices, shape, len(samples)), labels, indices[:, 0].long()


def augment(x: spconv.SparseConvTensor, gen: torch.Generator) -> spconv.SparseConvTensor:
    """The batch mirrored along x and/or y and/or with x and y swapped (each with probability 1/2): the
    room seen in one of its 8 flips/quarter turns. Rows keep their order, so the targets still match;
    the voxel-offset features (columns 1 and 2: x, y) turn with the grid."""
    idx, f, shape = x.indices.clone(), x.features.clone(), list(x.spatial_shape)
    flip_x, flip_y, swap = (torch.rand(3, generator=gen) < 0.5).tolist()
    if flip_x:
        idx[:, 3] = shape[2] - 1 - idx[:, 3]
        f[:, 1] = -f[:, 1]
    if flip_y:
        idx[:, 2] = shape[1] - 1 - idx[:, 2]
        f[:, 2] = -f[:, 2]
    if swap:
        idx = idx[:, [0, 1, 3, 2]]
        f = f[:, [0, 2, 1, *range(3, f.shape[1])]]
        shape = [shape[0], shape[2], shape[1]]
    return spconv.SparseConvTensor(f, idx.contiguous(), shape, x.batch_size)


# --------------------------------------------------------------------------------------------------
# model

def _block(cin, cout, key, norm, conv=None):
    conv = conv or spconv.SubMConv3d(cin, cout, 3, bias=not norm, indice_key=key)
    return spconv.SparseSequential(conv, nn.BatchNorm1d(cout) if norm else nn.Identity(), nn.ReLU())


class SparseUNet(nn.Module):
    """Three-level sparse U-Net for per-voxel classification.

    Input: SparseConvTensor with features ``[N, in_channels]``; output: logits ``[N, num_classes]``
    on the input's sites, in the input's row order.

    Level l works at stride 2^l. Encoder: SubMConv3d blocks (indice_key ``subm{l}``, shared by every
    SubM layer of that level), SparseConv3d(k=2, s=2) downsampling (``down{l}``). Decoder:
    SparseInverseConv3d(k=2) with the same ``down{l}`` key restores exactly the finer level's sites,
    so the skip features concatenate row by row. ``norm=False`` drops BatchNorm (used by the DDP
    example so that gradients do not depend on how the batch is split).
    """

    def __init__(self, in_channels: int, num_classes: int, width: int = 16, norm: bool = True):
        super().__init__()
        c1, c2, c3 = width, 2 * width, 4 * width
        self.enc1 = spconv.SparseSequential(_block(in_channels, c1, "subm1", norm), _block(c1, c1, "subm1", norm))
        self.down1 = _block(c1, c2, None, norm, spconv.SparseConv3d(c1, c2, 2, stride=2, bias=not norm,
                                                                   indice_key="down1"))
        self.enc2 = spconv.SparseSequential(_block(c2, c2, "subm2", norm), _block(c2, c2, "subm2", norm))
        self.down2 = _block(c2, c3, None, norm, spconv.SparseConv3d(c2, c3, 2, stride=2, bias=not norm,
                                                                   indice_key="down2"))
        self.bottom = spconv.SparseSequential(_block(c3, c3, "subm3", norm), _block(c3, c3, "subm3", norm))
        self.up2 = _block(c3, c2, None, norm, spconv.SparseInverseConv3d(c3, c2, 2, indice_key="down2",
                                                                        bias=not norm))
        self.dec2 = _block(2 * c2, c2, "subm2", norm)
        self.up1 = _block(c2, c1, None, norm, spconv.SparseInverseConv3d(c2, c1, 2, indice_key="down1",
                                                                        bias=not norm))
        self.dec1 = _block(2 * c1, c1, "subm1", norm)
        self.head = nn.Linear(c1, num_classes)

    def forward(self, x: spconv.SparseConvTensor) -> torch.Tensor:
        x1 = self.enc1(x)
        x2 = self.enc2(self.down1(x1))
        x3 = self.bottom(self.down2(x2))
        u2 = self.up2(x3)  # x2's sites, in x2's row order
        u2 = self.dec2(u2.replace_feature(torch.cat([u2.features, x2.features.to(u2.features.dtype)], 1)))
        u1 = self.up1(u2)  # x1's (= the input's) sites
        u1 = self.dec1(u1.replace_feature(torch.cat([u1.features, x1.features.to(u1.features.dtype)], 1)))
        return self.head(u1.features)


def per_sample_loss(logits: torch.Tensor, labels: torch.Tensor, batch: torch.Tensor, batch_size: int):
    """Cross-entropy averaged over the voxels of each sample, then over the samples: the loss of a
    batch is the mean of its samples' losses, however the samples are split across processes."""
    ce = F.cross_entropy(logits.float(), labels, reduction="none")
    per = torch.zeros(batch_size, dtype=ce.dtype).index_add(0, batch, ce)
    count = torch.bincount(batch, minlength=batch_size).clamp(min=1)
    return (per / count).mean()


def miou(pred: torch.Tensor, target: torch.Tensor, num_classes: int = len(CLASSES)):
    """(mean IoU over the classes present in target or prediction, per-class IoU list; nan if absent)."""
    ious = []
    for c in range(num_classes):
        inter = int(((pred == c) & (target == c)).sum())
        union = int(((pred == c) | (target == c)).sum())
        ious.append(inter / union if union else float("nan"))
    return float(np.nanmean(ious)), ious


def autocast_context(enabled: bool, device: torch.device):
    """bf16 autocast on the CPU, fp16 on CUDA; a null context when disabled."""
    if not enabled:
        return contextlib.nullcontext()
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.float16)
    return torch.autocast("cpu", dtype=torch.bfloat16)


# --------------------------------------------------------------------------------------------------

def prepare(data_dir: str, voxel_size: float, max_points: int = 0):
    """(points N x 6, per-point targets N, description, normal method); the targets are derived on the
    whole scene, then ``max_points`` random points are kept (0: all)."""
    points, source = load_scannet(data_dir)
    normals, method = estimate_normals(points[:, :3].astype(np.float64))
    labels = derive_labels(points[:, :3], normals)
    if max_points and len(points) > max_points:
        keep = np.sort(np.random.default_rng(0).permutation(len(points))[:max_points])
        points, labels = points[keep], labels[keep]
    return points, labels, source, method


def save_pictures(out, losses, parts, cut, title):
    """Loss curve, and the room from above: target vs prediction per point. ``parts`` is a list of
    (Sample, voxel predictions [M]); the voxel predictions reach the points through
    gather_features_by_pc_voxel_id."""
    plt = pyplot()
    loss_png = os.path.join(out, "segmentation_loss.png")
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(losses, lw=1)
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy")
    ax.set_yscale("log")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(loss_png, dpi=100)
    plt.close(fig)

    point_preds = [gather_features_by_pc_voxel_id(pred, s.pc_voxel_id, invalid_value=-1) for s, pred in parts]
    xyz = np.concatenate([s.points[:, :3] for s, _ in parts])
    target = np.concatenate([s.point_labels.numpy() for s, _ in parts])
    predicted = torch.cat(point_preds).numpy()
    order = np.argsort(xyz[:, 2])  # draw low points first, so the view is from above
    topdown_png = os.path.join(out, "segmentation_topdown.png")
    fig, axes = plt.subplots(1, 2, figsize=(12, 6))
    for ax, lab, name in ((axes[0], target, "target (from height and normals)"),
                          (axes[1], predicted, "prediction (sparse U-Net)")):
        lab = lab[order]
        keep = lab >= 0
        ax.scatter(xyz[order][keep, 0], xyz[order][keep, 1], c=CLASS_COLORS[lab[keep]], s=1.5, linewidths=0)
        if np.isfinite(cut):
            ax.axvline(cut, color="black", ls="--", lw=1)
            ax.text(cut, xyz[:, 1].max(), " held out", va="bottom", fontsize=9)
        ax.set_aspect("equal")
        ax.set_title(name)
        ax.set_xlabel("x (m)")
        ax.set_ylabel("y (m)")
    handles = [plt.Line2D([], [], marker="o", ls="", color=CLASS_COLORS[i], label=c) for i, c in enumerate(CLASSES)]
    fig.legend(handles=handles, loc="lower center", ncol=3)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    fig.savefig(topdown_png, dpi=100)
    plt.close(fig)
    return [loss_png, topdown_png], point_preds


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=DEFAULT_DATA, help="folder with scannet_scene0000_00.bin (default ../shared/data)")
    ap.add_argument("--out", default=DEFAULT_OUT, help="folder for the PNGs (default example/output)")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--voxel-size", type=float, default=0.05)
    ap.add_argument("--width", type=int, default=16, help="channels of the first U-Net level")
    ap.add_argument("--holdout", type=float, default=0.25,
                    help="fraction of the room (largest x) left out of training and evaluated separately")
    ap.add_argument("--no-augment", dest="augment", action="store_false",
                    help="train without the random flips / quarter turns of the room")
    ap.add_argument("--amp", action="store_true", help="bf16 autocast on the CPU (fp16 on CUDA)")
    ap.add_argument("--device", default="cpu", help="cpu (default) or cuda, when a GPU backend is present")
    ap.add_argument("--quick", action="store_true", help="10 cm voxels, 12k points, width 8, <= 40 steps")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    torch.manual_seed(args.seed)
    out = out_dir(args.out)
    steps, voxel_size, width, max_points = args.steps, args.voxel_size, args.width, 0
    if args.quick:
        steps, voxel_size, width, max_points = min(steps, 40), 0.1, 8, 12000
    device = torch.device(args.device)

    points, labels, source, method = prepare(args.data, voxel_size, max_points)
    print(f"input: {source}, {len(points)} points; normals: {method}")
    counts = np.bincount(labels, minlength=3)
    print("target: " + ", ".join(f"{c} {n / len(labels) * 100:.0f}%" for c, n in zip(CLASSES, counts)))
    cut = float(np.quantile(points[:, 0], 1 - args.holdout)) if args.holdout > 0 else float("inf")
    in_train = points[:, 0] < cut
    sample = Sample(points[in_train], labels[in_train], voxel_size)
    held = Sample(points[~in_train], labels[~in_train], voxel_size) if (~in_train).any() else None
    x, y, batch = make_batch([sample])
    print(f"voxels: {len(sample.coords)} of {voxel_size * 100:.0f} cm in a {sample.spatial_shape} (z, y, x) grid "
          f"for training" + (f", {len(held.coords)} held out (x >= {cut:.2f} m)" if held is not None else ""))

    model = SparseUNet(x.features.shape[1], len(CLASSES), width).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    scaler = torch.amp.GradScaler("cuda") if args.amp and device.type == "cuda" else None

    def to_device(t: spconv.SparseConvTensor) -> spconv.SparseConvTensor:
        if device.type == "cpu":
            return t
        return spconv.SparseConvTensor(t.features.to(device), t.indices.to(device), t.spatial_shape, t.batch_size)

    x, y, batch = to_device(x), y.to(device), batch.to(device)
    losses = []
    t0 = time.perf_counter()
    bar = progress(range(steps), desc="training" + (" (amp)" if args.amp else ""), unit="step")
    model.train()
    gen = torch.Generator().manual_seed(args.seed)
    for step in bar:
        xa = augment(x, gen) if args.augment else x
        with autocast_context(args.amp, device):
            logits = model(xa)
        loss = per_sample_loss(logits, y, batch, 1)
        opt.zero_grad()
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        else:
            loss.backward()
            opt.step()
        losses.append(loss.item())
        if hasattr(bar, "set_postfix"):
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
        if (step + 1) % max(1, steps // 5) == 0 or step == steps - 1:
            acc = float((logits.argmax(1) == y).float().mean())
            log(f"step {step + 1:4d}: loss {losses[-1]:.4f}, voxel accuracy {acc * 100:.1f}%")
    train_time = time.perf_counter() - t0
    print(f"{steps} steps in {train_time:.1f} s ({train_time / max(steps, 1) * 1e3:.0f} ms/step"
          f"{', bf16 autocast' if args.amp and device.type == 'cpu' else ''}); loss {losses[0]:.4f} -> {losses[-1]:.4f}")

    model.eval()
    results, parts = {}, []
    for name, s in (("training region", sample), ("held-out region", held)):
        if s is None:
            continue
        xs, ys, _ = make_batch([s])
        with torch.no_grad(), autocast_context(args.amp, device):
            pred = model(to_device(xs)).argmax(1).cpu()
        m, ious = miou(pred, ys)
        results[name] = (m, ious)
        parts.append((s, pred))
        print(f"mIoU, {name}: {m:.3f} (" + ", ".join(f"{c} {iou:.3f}" for c, iou in zip(CLASSES, ious)) + ")")
    m, ious = results["training region"]
    m_held = results["held-out region"][0] if "held-out region" in results else float("nan")
    pngs, point_preds = save_pictures(out, losses, parts, cut,
                                      f"sparse U-Net: mIoU {m:.3f} (train) / {m_held:.3f} (held out)")
    point_acc = float((point_preds[0] == sample.point_labels).float().mean())
    print(f"per-point accuracy, training region (voxel predictions gathered back to the points): "
          f"{point_acc * 100:.1f}%")
    for p in pngs:
        print(f"wrote {p}")
    return {"losses": losses, "miou": m, "ious": ious, "miou_heldout": m_held, "pngs": pngs,
            "num_voxels": len(sample.coords), "point_accuracy": point_acc, "normals": method, "source": source}


if __name__ == "__main__":
    main()

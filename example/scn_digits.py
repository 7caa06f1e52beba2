"""Handwritten digits with a SparseConvNet-style VGG network (spconv.scn) on the CPU.

Data: the UCI handwritten digits that ship with scikit-learn (``sklearn.datasets.load_digits``,
1,797 images of 8x8 pixels with 17 grey levels). Each image is turned into sparse pen strokes:
the centres of the inked pixels are (randomly, when training) rotated, scaled, sheared and
shifted, then every pair of 8-neighbouring inked pixels is joined by a line drawn on a fine
grid; the line's sites carry the ink intensity (one feature plane). The strokes go through
``scn.InputLayer`` (mode 4: sites hit twice are averaged), a SparseVggNet with a VGG+ block,
a strided convolution down to 1x1 and a linear classifier.

    python example/scn_digits.py --threads 1   # full run: 98.7% test accuracy in about 1.5 minutes
    python example/scn_digits.py --quick       # smoke test: a few hundred samples, seconds

(``--threads 1`` is fastest on a busy 2-core machine: the batches are small.)
"""
import argparse
import math
import time

import numpy as np
import torch
from tqdm import tqdm

import spconv.scn as scn

SCALE = 3.2  # grid cells per image pixel
NEIGHBOURS = [(0, 1), (1, -1), (1, 0), (1, 1)]  # each undirected 8-neighbour pair once


def load_digits_split(seed: int = 0, test_fraction: float = 0.25):
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    digits = load_digits()
    images = digits.images.astype(np.float32) / 16.0  # [N, 8, 8] in [0, 1]
    return train_test_split(images, digits.target, test_size=test_fraction, random_state=seed,
                            stratify=digits.target)


def strokes(image: np.ndarray, grid: int, rng=None, threshold: float = 0.2, steps: int = 8):
    """Sites ``[n, 2]`` (int64, inside ``[0, grid)``) and ink ``[n, 1]`` of one 8x8 image."""
    ys, xs = np.nonzero(image > threshold)
    centre = np.array([3.5, 3.5])
    pts = np.stack([ys, xs], 1).astype(np.float64) - centre
    a = np.eye(2)
    shift = np.zeros(2)
    if rng is not None:  # random affine distortion of the pen positions
        t = rng.uniform(-0.25, 0.25)
        s = rng.uniform(0.85, 1.15, size=2)
        shear = rng.uniform(-0.2, 0.2)
        a = np.array([[math.cos(t), -math.sin(t)], [math.sin(t), math.cos(t)]]) @ np.diag(s) @ np.array(
            [[1, shear], [0, 1]])
        shift = rng.uniform(-2, 2, size=2)
    pts = pts @ a.T * SCALE + (grid - 1) / 2 + shift
    ink = image[ys, xs]
    index = -np.ones((8, 8), dtype=np.int64)
    index[ys, xs] = np.arange(len(ys))
    segs_a, segs_b = [np.arange(len(ys))], [np.arange(len(ys))]  # isolated pixels: a point
    for dy, dx in NEIGHBOURS:
        y2, x2 = ys + dy, xs + dx
        ok = (y2 >= 0) & (y2 < 8) & (x2 >= 0) & (x2 < 8)
        j = np.full(len(ys), -1)
        j[ok] = index[y2[ok], x2[ok]]
        keep = j >= 0
        segs_a.append(np.nonzero(keep)[0])
        segs_b.append(j[keep])
    ia, ib = np.concatenate(segs_a), np.concatenate(segs_b)
    t = np.linspace(0, 1, steps)[:, None, None]
    line = pts[ia][None] * (1 - t) + pts[ib][None] * t  # [steps, segments, 2]
    vals = ink[ia][None] * (1 - t[..., 0]) + ink[ib][None] * t[..., 0]
    coords = np.rint(line.reshape(-1, 2)).astype(np.int64)
    vals = vals.reshape(-1, 1).astype(np.float32)
    inside = ((coords >= 0) & (coords < grid)).all(1)
    return coords[inside], vals[inside]


def make_batch(images, grid: int, rng=None):
    """InputLayer input: coords ``[n, 3]`` (y, x, sample index last) and features ``[n, 1]``."""
    coords, feats = [], []
    for i, img in enumerate(images):
        c, f = strokes(img, grid, rng)
        coords.append(np.concatenate([c, np.full((len(c), 1), i)], 1))
        feats.append(f)
    return torch.from_numpy(np.concatenate(coords)), torch.from_numpy(np.concatenate(feats)), len(images)


class Model(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.sparse = scn.Sequential().add(
            scn.SparseVggNet(2, 1, [['C', 16], ['C', 16], 'MP',
                                    ['C', 32], ['C', 32], 'MP',
                                    ['C', 48, 16], 'MP',
                                    ['C', 64], ['C', 64]])
        ).add(scn.Convolution(2, 64, 128, 3, 2, False)).add(scn.BatchNormReLU(128)).add(scn.SparseToDense(2, 128))
        self.grid = self.sparse.input_spatial_size(torch.LongTensor([1, 1]))  # 31 x 31
        self.input_layer = scn.InputLayer(2, self.grid, mode=4)
        self.linear = torch.nn.Linear(128, 10)

    def forward(self, coords, feats, batch_size):
        x = self.input_layer([coords, feats, batch_size])
        return self.linear(self.sparse(x).flatten(1))


def evaluate(model, images, labels, grid, batch=200):
    model.eval()
    correct = 0
    with torch.no_grad():
        for s in range(0, len(images), batch):
            c, f, b = make_batch(images[s:s + batch], grid)
            correct += int((model(c, f, b).argmax(1).numpy() == labels[s:s + batch]).sum())
    return correct / len(images)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke test: small subset, two short epochs")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=0.003)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    x_train, x_test, y_train, y_test = load_digits_split(args.seed)
    if args.quick:
        x_train, y_train, x_test, y_test = x_train[:320], y_train[:320], x_test[:200], y_test[:200]
        args.epochs = 2
    model = Model()
    grid = int(model.grid[0])  # square grid
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    steps = args.epochs * math.ceil(len(x_train) / args.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=steps)
    print(f"spconv.scn digits: {len(x_train)} train / {len(x_test)} test images, input grid "
          f"{grid}x{grid}, {sum(p.numel() for p in model.parameters())} parameters")
    start = time.time()
    history = []
    for epoch in range(args.epochs):
        model.train()
        order = rng.permutation(len(x_train))
        total, seen, correct = 0.0, 0, 0
        bar = tqdm(range(0, len(order), args.batch_size), desc=f"epoch {epoch + 1}/{args.epochs}", leave=False)
        for s in bar:
            idx = order[s:s + args.batch_size]
            c, f, b = make_batch(x_train[idx], grid, rng)
            target = torch.from_numpy(y_train[idx]).long()
            logits = model(c, f, b)
            loss = torch.nn.functional.cross_entropy(logits, target)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
            seen += len(idx)
            correct += int((logits.argmax(1) == target).sum())
            bar.set_postfix(loss=f"{total / seen:.3f}", acc=f"{correct / seen:.3f}")
        acc = evaluate(model, x_test, y_test, grid)
        history.append({"epoch": epoch + 1, "loss": total / seen, "train_acc": correct / seen, "test_acc": acc})
        print(f"epoch {epoch + 1}: train loss {total / seen:.4f}, train acc {correct / seen:.4f}, "
              f"test acc {acc:.4f}, {time.time() - start:.0f}s")
    print(f"final test accuracy {history[-1]['test_acc']:.4f} after {time.time() - start:.0f}s")
    return history


if __name__ == "__main__":
    main()

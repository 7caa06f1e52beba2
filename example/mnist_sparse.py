"""Digits with sparse 2D convolutions: dense images -> SparseConvTensor.from_dense -> a small sparse CNN.

Uses scikit-learn's bundled 8x8 handwritten digits (load_digits: 1,797 images, shipped inside the
package, nothing is downloaded), upsampled to 24x24 and thresholded so that about a third of the
pixels are active. Without scikit-learn a generated set of 10 stroke patterns stands in.
Trains SubMConv2d / SparseConv2d / SparseMaxPool2d layers and a linear head, prints the loss per
epoch and the test accuracy, and writes into --out (default example/output/):
  mnist_sparse_loss.png         training loss per step
  mnist_sparse_predictions.png  test digits (active sites only) with predicted / true labels

usage: python example/mnist_sparse.py [--epochs N] [--out DIR] [--quick]
"""
import argparse
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import spconv.pytorch as spconv  # noqa: E402

from _common import DEFAULT_OUT, log, out_dir, progress, pyplot  # noqa: E402

SIZE = 24


def generated_digits(n=1800, seed=0):
    """(images [n, 8, 8] in 0..16, labels [n]): 10 stroke patterns with jitter, a stand-in for load_digits."""
    rng = np.random.default_rng(seed)
    templates = np.zeros((10, 8, 8))
    templates[0, 1:7, [1, 6]] = 16; templates[0, [1, 6], 1:7] = 16            # ring
    templates[1, 1:7, 4] = 16                                                  # vertical bar
    templates[2, 4, 1:7] = 16                                                  # horizontal bar
    templates[3, np.arange(1, 7), np.arange(1, 7)] = 16                        # diagonal
    templates[4, np.arange(1, 7), np.arange(6, 0, -1)] = 16                    # anti-diagonal
    templates[5, 1:7, 4] = 16; templates[5, 4, 1:7] = 16                       # plus
    templates[6, np.arange(1, 7), np.arange(1, 7)] = 16; templates[6, np.arange(1, 7), np.arange(6, 0, -1)] = 16
    templates[7, 1:7, 1] = 16; templates[7, 6, 1:7] = 16                       # L
    templates[8, 1, 1:7] = 16; templates[8, 1:7, 4] = 16                       # T
    templates[9, 2:6, 2:6] = 16                                                # block
    labels = rng.integers(0, 10, n)
    images = np.zeros((n, 8, 8))
    for i, lab in enumerate(labels):
        dy, dx = rng.integers(-1, 2, 2)
        images[i] = np.roll(templates[lab], (dy, dx), (0, 1)) * rng.uniform(0.6, 1.0)
    return images, labels


def load_data():
    """(images [n, 8, 8] float in 0..16, labels [n] int, description)."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        images, labels = generated_digits()
        return images, labels, "generated stroke patterns (scikit-learn is not installed)"
    d = load_digits()
    return d.images, d.target, "scikit-learn's bundled 8x8 digits (load_digits)"


def to_dense_batch(images: np.ndarray) -> torch.Tensor:
    """[n, 8, 8] -> channels-last [n, SIZE, SIZE, 1] in [0, 1], pixels below 0.25 set to exactly 0 (inactive)."""
    x = torch.from_numpy(np.asarray(images, dtype=np.float32) / 16.0).unsqueeze(1)
    x = F.interpolate(x, size=(SIZE, SIZE), mode="bilinear", align_corners=False)
    x = torch.where(x < 0.25, torch.zeros_like(x), x)
    return x.permute(0, 2, 3, 1).contiguous()


class SparseDigitNet(nn.Module):
    """24x24 sparse input -> SubM (24) -> strided conv (12) -> SubM -> max pool (6) -> dense -> linear."""

    def __init__(self, num_classes=10):
        super().__init__()
        self.net = spconv.SparseSequential(
            spconv.SubMConv2d(1, 16, 3, indice_key="subm24"), nn.BatchNorm1d(16), nn.ReLU(),
            spconv.SubMConv2d(16, 16, 3, indice_key="subm24"), nn.BatchNorm1d(16), nn.ReLU(),
            spconv.SparseConv2d(16, 32, 3, stride=2, padding=1, indice_key="down12"), nn.BatchNorm1d(32), nn.ReLU(),
            spconv.SubMConv2d(32, 32, 3, indice_key="subm12"), nn.BatchNorm1d(32), nn.ReLU(),
            spconv.SparseMaxPool2d(2, 2),
            spconv.ToDense(),  # [B, 32, 6, 6]
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(0.2), nn.Linear(32 * 6 * 6, num_classes))

    def forward(self, x: spconv.SparseConvTensor) -> torch.Tensor:
        return self.head(self.net(x))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--out", default=DEFAULT_OUT, help="folder for the PNGs (default example/output)")
    ap.add_argument("--quick", action="store_true", help="600 training images, 2 epochs (a smoke test)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    torch.manual_seed(args.seed)
    out = out_dir(args.out)

    images, labels, source = load_data()
    rng = np.random.default_rng(args.seed)
    order = rng.permutation(len(images))
    n_test = len(images) // 6
    test_idx, train_idx = order[:n_test], order[n_test:]
    epochs = args.epochs
    if args.quick:
        train_idx, test_idx, epochs = train_idx[:600], test_idx[:200], min(epochs, 2)
    x_train, y_train = to_dense_batch(images[train_idx]), torch.from_numpy(labels[train_idx]).long()
    x_test, y_test = to_dense_batch(images[test_idx]), torch.from_numpy(labels[test_idx]).long()
    density = float((x_train != 0).float().mean())
    print(f"data: {source}; {len(train_idx)} train / {len(test_idx)} test images, {SIZE}x{SIZE}, "
          f"{density * 100:.0f}% of the pixels active")

    model = SparseDigitNet()
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    losses = []
    t0 = time.perf_counter()
    steps_per_epoch = (len(x_train) + args.batch_size - 1) // args.batch_size
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(len(x_train))
        bar = progress(range(steps_per_epoch), desc=f"epoch {epoch + 1}/{epochs}", unit="step")
        for s in bar:
            idx = perm[s * args.batch_size:(s + 1) * args.batch_size]
            x = spconv.SparseConvTensor.from_dense(x_train[idx])
            loss = F.cross_entropy(model(x), y_train[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
            if hasattr(bar, "set_postfix"):
                bar.set_postfix(loss=f"{losses[-1]:.3f}")
        log(f"epoch {epoch + 1}: mean training loss {np.mean(losses[-steps_per_epoch:]):.4f}")
    train_time = time.perf_counter() - t0

    model.eval()
    with torch.no_grad():
        pred = torch.cat([model(spconv.SparseConvTensor.from_dense(x_test[i:i + 256])).argmax(1)
                          for i in range(0, len(x_test), 256)])
    accuracy = float((pred == y_test).float().mean())
    print(f"test accuracy: {accuracy * 100:.1f}% on {len(y_test)} images (training {train_time:.1f} s, "
          f"{len(losses)} steps)")

    plt = pyplot()
    loss_png = os.path.join(out, "mnist_sparse_loss.png")
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(losses, lw=1)
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy")
    ax.set_title(f"sparse digit CNN, test accuracy {accuracy * 100:.1f}%")
    fig.tight_layout()
    fig.savefig(loss_png, dpi=100)
    plt.close(fig)

    pred_png = os.path.join(out, "mnist_sparse_predictions.png")
    fig, axes = plt.subplots(3, 8, figsize=(10, 4.2))
    for i, ax in enumerate(axes.flat):
        if i >= len(x_test):
            ax.axis("off")
            continue
        img = np.ma.masked_equal(x_test[i, :, :, 0].numpy(), 0)
        ax.imshow(img, cmap="viridis", vmin=0, vmax=1)
        ok = int(pred[i]) == int(y_test[i])
        ax.set_title(f"{int(pred[i])} / {int(y_test[i])}", color="green" if ok else "red", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle("predicted / true (only the active sites are drawn)")
    fig.tight_layout()
    fig.savefig(pred_png, dpi=100)
    plt.close(fig)
    print(f"wrote {loss_png}")
    print(f"wrote {pred_png}")
    return {"losses": losses, "accuracy": accuracy, "pngs": [loss_png, pred_png], "source": source,
            "density": density}


if __name__ == "__main__":
    main()

"""Helpers shared by the examples: the data folder and its generated fallbacks, the output folder,
matplotlib on the Agg backend and tqdm (a no-op stand-in when tqdm is not installed).

The real scans live in ../shared/data relative to the repository root (see its README); every
example falls back to a generated scene of the same layout when that folder is absent.
"""
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
DEFAULT_DATA = os.path.normpath(os.path.join(ROOT, "..", "shared", "data"))
DEFAULT_OUT = os.path.join(HERE, "output")

try:
    from tqdm import tqdm
except ImportError:  # pragma: no cover - setup.sh installs tqdm
    def tqdm(iterable=None, **kwargs):
        return iterable if iterable is not None else range(kwargs.get("total", 0))


def log(msg: str):
    """Prints a line without breaking a running progress bar."""
    if hasattr(tqdm, "write"):
        tqdm.write(msg, file=sys.stdout)
    else:
        print(msg)


def out_dir(path: str) -> str:
    os.makedirs(path, exist_ok=True)
    return path


def pyplot():
    """matplotlib.pyplot on the non-interactive Agg backend (PNG files, no display needed)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def progress(iterable=None, **kwargs):
    """tqdm progress bar on stderr (off when the environment sets SPCONV_EXAMPLE_QUIET=1)."""
    kwargs.setdefault("file", sys.stderr)
    kwargs.setdefault("disable", os.environ.get("SPCONV_EXAMPLE_QUIET") == "1")
    kwargs.setdefault("dynamic_ncols", True)
    return tqdm(iterable, **kwargs)


# --------------------------------------------------------------------------------------------------
# scans, or generated stand-ins of the same layout

def generated_street(n=20000, seed=0) -> np.ndarray:
    """A synthetic street, N x 4 (x, y, z, reflectance): ground, two facades and a few car-sized boxes."""
    rng = np.random.default_rng(seed)
    ground = np.c_[rng.uniform(0, 70, n // 2), rng.uniform(-40, 40, n // 2), rng.normal(-1.7, 0.02, n // 2)]
    walls = np.c_[rng.uniform(0, 70, n // 4), rng.choice([-12.0, 12.0], n // 4), rng.uniform(-1.7, 2.0, n // 4)]
    boxes = []
    for cx, cy in rng.uniform([5, -10], [60, 10], size=(8, 2)):
        boxes.append(np.c_[rng.uniform(cx, cx + 4, n // 32), rng.uniform(cy, cy + 1.8, n // 32),
                           rng.uniform(-1.7, -0.2, n // 32)])
    xyz = np.concatenate([ground, walls] + boxes).astype(np.float32)
    return np.c_[xyz, rng.uniform(0, 1, len(xyz)).astype(np.float32)]


def generated_room(n=30000, seed=0) -> np.ndarray:
    """A synthetic furnished room, N x 6 (x, y, z, r, g, b in 0..255): a 6 x 5 m floor, four 2.6 m
    walls, a table and two boxes. Points are sampled on the surfaces with 5 mm noise."""
    rng = np.random.default_rng(seed)
    w, d, h = 6.0, 5.0, 2.6
    parts = []

    def plane(m, origin, u, v, color):
        a, b = rng.uniform(0, 1, (2, m, 1))
        pts = origin + a * np.asarray(u) + b * np.asarray(v) + rng.normal(0, 0.005, (m, 3))
        col = np.clip(np.asarray(color) + rng.normal(0, 12, (m, 3)), 0, 255)
        parts.append(np.c_[pts, col])

    plane(n * 3 // 10, [0, 0, 0], [w, 0, 0], [0, d, 0], [150, 110, 80])  # wooden floor
    for origin, u in (([0, 0, 0], [w, 0, 0]), ([0, d, 0], [w, 0, 0]), ([0, 0, 0], [0, d, 0]), ([w, 0, 0], [0, d, 0])):
        plane(n * 3 // 20, origin, u, [0, 0, h], [210, 205, 195])  # painted walls
    plane(n // 20, [2.0, 1.5, 0.75], [1.6, 0, 0], [0, 0.9, 0], [90, 60, 40])  # table top
    for x0, y0, sx, sy, sz, col in ((4.2, 3.2, 0.8, 0.8, 0.5, [40, 90, 160]), (0.6, 3.6, 1.0, 0.6, 0.9, [160, 50, 50])):
        plane(n // 40, [x0, y0, sz], [sx, 0, 0], [0, sy, 0], col)  # box lid
        for origin, u in (([x0, y0, 0], [sx, 0, 0]), ([x0, y0 + sy, 0], [sx, 0, 0]), ([x0, y0, 0], [0, sy, 0]),
                          ([x0 + sx, y0, 0], [0, sy, 0])):
            plane(n // 80, origin, u, [0, 0, sz], col)  # box sides
    pts = np.concatenate(parts).astype(np.float32)
    return pts[rng.permutation(len(pts))]


def load_kitti(data_dir: str = DEFAULT_DATA):
    """(points N x 4 float32, description): the KITTI scan, or a generated street when it is absent."""
    path = os.path.join(data_dir, "kitti_000008.bin")
    if os.path.exists(path):
        return np.fromfile(path, dtype=np.float32).reshape(-1, 4), f"KITTI scan {os.path.normpath(path)}"
    return generated_street(), f"generated street scene ({os.path.normpath(path)} not found)"


def load_scannet(data_dir: str = DEFAULT_DATA):
    """(points N x 6 float32 xyz rgb, description): the ScanNet scene, or a generated room when it is absent."""
    path = os.path.join(data_dir, "scannet_scene0000_00.bin")
    if os.path.exists(path):
        return np.fromfile(path, dtype=np.float32).reshape(-1, 6), f"ScanNet scene {os.path.normpath(path)}"
    return generated_room(), f"generated room ({os.path.normpath(path)} not found)"


def have_open3d():
    """(True, None) when open3d imports, else (False, the reason)."""
    try:
        import open3d  # noqa: F401
    except Exception as e:  # ImportError, or OSError for a missing libusb-1.0.so.0
        return False, f"{type(e).__name__}: {e}"
    return True, None

"""``python -m spconv.check``: every device op against the CPU kernels; here the Triton kernels in the interpreter."""
import contextlib
import subprocess
import sys
import warnings

import pytest
import torch

pytest.importorskip("triton")

from spconv import check  # noqa: E402
from spconv.triton.dispatch import triton_on_cpu  # noqa: E402


def test_every_op_checked_and_equal_in_the_interpreter():
    results = check.check_ops("cpu", n=40, channels=8, on_device=triton_on_cpu)
    names = {r[0] for r in results}
    assert {"build_subm_map", "build_conv_map", "invert_map", "gather_conv", "gather_conv_weight_grad",
            "maxpool_forward/backward", "avgpool_forward", "active_counts"} <= names
    assert all(ok for _, _, ok, _ in results), [r for r in results if not r[2]]


@contextlib.contextmanager
def _wrong_gather_conv():
    """A 'device' whose gather_conv returns zeros: the check must flag it."""
    lib = torch.library.Library("spconv", "IMPL")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="(?s).*Overriding a previously registered kernel")
        lib.impl("gather_conv", lambda f, t, w, g, tr: torch.zeros(t.shape[0], w.shape[0], dtype=f.dtype), "CPU")
    try:
        yield
    finally:
        lib._destroy()


def test_a_wrong_kernel_fails_the_check():
    results = {r[0]: r for r in check.check_ops("cpu", n=40, channels=8, on_device=_wrong_gather_conv)}
    assert not results["gather_conv"][2] and "relative error" in results["gather_conv"][3]
    assert results["build_subm_map"][2]  # the others still pass
    assert torch.ops.spconv.gather_conv(torch.ones(2, 1), torch.zeros(1, 1, dtype=torch.int32),
                                        torch.ones(1, 1, 1), 1, False).sum() == 1  # C++ kernel restored


def test_command_line():
    r = subprocess.run([sys.executable, "-m", "spconv.check", "--device", "interpreter"], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "8 of 8 op checks passed" in r.stdout
    r = subprocess.run([sys.executable, "-m", "spconv.check"], capture_output=True, text=True, timeout=300)
    if not torch.cuda.is_available():
        assert r.returncode == 2 and "no CUDA device here" in r.stdout

"""Suite-wide pytest set-up.

test/triton runs the Triton kernels in Triton's interpreter, which must be switched on
(TRITON_INTERPRET=1) before triton is first imported, so it runs in its own pytest process:
`TRITON_INTERPRET=1 python -m pytest test/triton` (scripts/test.sh does both runs). A run without
that variable does not collect it.
"""
import os

collect_ignore = [] if os.environ.get("TRITON_INTERPRET") == "1" else ["triton"]

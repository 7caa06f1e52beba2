"""Triton backend tests, in their own pytest process: `TRITON_INTERPRET=1 python -m pytest test/triton`.

There is no GPU here: the kernels run on CPU tensors in Triton's interpreter, which must be on before
triton is first imported. Without triton installed the tests skip with that reason.
"""
import os
import sys

os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # test/helpers.py

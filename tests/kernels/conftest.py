"""Kernel tests run on CPU through Triton's interpreter when no CUDA device is present.

TRITON_INTERPRET is read when a kernel is decorated, i.e. when its module is first imported;
tests/conftest.py sets it before any turbollm import (other test directories import the
kernels through layers/attention.py before this file loads). Setting it here as well keeps
`pytest tests/kernels/...` right if that ever moves. The interpreter's NumPy work-around lives
there too (every test directory runs kernels through the interpreter).
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

"""Kernel tests run on CPU through Triton's interpreter when no CUDA device is present.

TRITON_INTERPRET is read when a kernel is decorated, i.e. when its module is first imported;
tests/conftest.py sets it before any turbollm import (other test directories import the
kernels through layers/attention.py before this file loads). Setting it here as well keeps
`pytest tests/kernels/...` right if that ever moves.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

    # Triton 3.6's interpreter turns a scalar into a Python int with int(ndarray of shape
    # [1]), which NumPy >= 2.4 rejects, so a loop with a runtime bound (range(start, end))
    # fails under the interpreter only (triton-lang/triton#9171; the fix there squeezes).
    from triton.runtime import interpreter as _interp

    _orig_patch_lang_tensor = _interp._patch_lang_tensor

    def _patch_lang_tensor(tensor, scope):  # type: ignore[no-untyped-def]
        _orig_patch_lang_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    _interp._patch_lang_tensor = _patch_lang_tensor

"""Helpers shared by the sampling tests."""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch


def host_syncs(fn: Callable[[], object]) -> list[str]:
    """The host-sync warnings CUDA's sync debug mode raises while fn runs (warm fn up first:
    lazy initialisation may sync)."""
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fn()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return [str(w.message) for w in caught if "synchroniz" in str(w.message)]

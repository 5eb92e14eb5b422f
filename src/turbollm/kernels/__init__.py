"""Triton kernels, one file per family, each with a typed launcher and a torch reference."""

"""Quantization: method configs + registered handlers (methods.py), runtime quantized linears
(linear.py), the contract's grids (grids.py), HF AWQ/GPTQ conversion (hf_formats.py), plans
that models/build.py consumes (plan.py) and quantized checkpoint writing (checkpoint.py)."""

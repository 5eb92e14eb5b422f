"""Simulated FP8 W8A8 (CPU) with an online block-Hadamard rotation of every decoder linear input
(QuaRot-style): y = e4m3_tok(x H) . e4m3_row(W H)^T, H block-diagonal Hadamard (blocks: the
largest power of two dividing K, at most CAP). Exact in real arithmetic. An experiment, not a
turbollm option: `PYTHONPATH=src python bench/scripts/w8a8_fp8_hadamard_sim.py [CAP]`."""
import sys, torch
import turbollm.quant.linear as L
from turbollm.quant import grids
from turbollm.kernels.rope_cache import hadamard
from turbollm.compress.evaluate import load_eval_model, make_windows, perplexity, default_window
from turbollm.compress.corpus import load_corpus
torch.set_num_threads(2)
cap = int(sys.argv[1]) if len(sys.argv) > 1 else 512
def block_h(k):
    b = k & -k
    b = min(b, cap)
    return torch.block_diag(*[hadamard(b)] * (k // b))
def apply(self, layer, x, bias):
    if not hasattr(layer, "_rot"):  # the float weight (kept at load) rotated, then e4m3 per row
        H = block_h(layer._w_float.shape[1])
        q, s = grids.quantize_fp8(layer._w_float @ H)
        layer._rot = (H, q.float() * s[:, None])
    H, w = layer._rot
    x2 = x.reshape(-1, x.shape[-1]) @ H
    xq, xs = grids.quantize_fp8_per_token(x2)
    y = torch.nn.functional.linear(xq.float() * xs, w)
    y = y if bias is None else y + bias
    return y.view(*x.shape[:-1], -1)
orig_process = L.Fp8LinearMethod.process_weights_after_loading
def process(self, layer):
    layer._w_float = layer.weight.detach().float().clone()
    orig_process(self, layer)
L.Fp8LinearMethod.apply = apply
L.Fp8LinearMethod.process_weights_after_loading = process
base = load_eval_model(None)
windows = make_windows(base.tokenizer, load_corpus("shakespeare"), default_window(base.context_length), 3)
ref = perplexity(base, windows).perplexity
print("fp32", ref, flush=True)
del base
em = load_eval_model(None, "fp8")
p = perplexity(em, windows).perplexity
print(f"fp8 W8A8 + block-Hadamard (cap {cap}) simulated: {p:.4f} {100*(p/ref-1):+.2f}%", flush=True)

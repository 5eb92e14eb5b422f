"""Where FP8 W8A8 loses its accuracy (CPU, simulated FP8): held-out perplexity with e4m3 weights
only, e4m3 activations only, or both, on every decoder linear or one projection type / the last
layer. Weights are W_hat = e4m3(W / s) * s with s = amax / 448 per row (grids.quantize_fp8),
activations are rounded per token by a forward pre-hook (grids.quantize_fp8_per_token): the
arithmetic of quant/linear.Fp8LinearMethod on CPU. An experiment, not a turbollm option:
`OMP_NUM_THREADS=1 PYTHONPATH=src python bench/scripts/w8a8_fp8_decompose.py [WINDOWS]` (default 3).
"""
import sys, time, torch, json
torch.set_num_threads(1)
from turbollm.compress.corpus import load_corpus
from turbollm.compress.evaluate import load_eval_model, make_windows, perplexity
from turbollm.compress.calibration import set_linear_weight
from turbollm.layers.linear import QuantizableLinear
from turbollm.quant import grids
NW = int(sys.argv[1]) if len(sys.argv) > 1 else 3
base = load_eval_model(None)
windows = make_windows(base.tokenizer, load_corpus("shakespeare"), 2048, NW)
lin = {n: m for n, m in base.model.named_modules() if isinstance(m, QuantizableLinear)}
W0 = {n: m.weight.detach().clone() for n, m in lin.items()}
WQ = {}
for n, w in W0.items():
    q, s = grids.quantize_fp8(w); WQ[n] = q.float() * s[:, None]
actq = set()
def hook(name):
    def f(m, args):
        if name in actq:
            xq, s = grids.quantize_fp8_per_token(args[0].reshape(-1, args[0].shape[-1]))
            return ((xq.float() * s).reshape(args[0].shape),)
    return f
for n, m in lin.items(): m.register_forward_pre_hook(hook(n))
ref = perplexity(base, windows).perplexity
print(f"fp32 {ref:.4f}", flush=True)
def run(label, wset, aset):
    for n, m in lin.items(): set_linear_weight(m, WQ[n] if n in wset else W0[n])
    actq.clear(); actq.update(aset)
    t = time.perf_counter(); p = perplexity(base, windows).perplexity
    print(f"{label:40s} {p:.4f} {100*(p/ref-1):+.2f}% ({time.perf_counter()-t:.0f}s)", flush=True)
allN = set(lin)
run("W+A all", allN, allN)
run("W only all", allN, set())
run("A only all", set(), allN)
for proj in ("qkv_proj", "o_proj", "gate_up_proj", "down_proj"):
    s = {n for n in allN if n.endswith(proj)}
    run(f"W+A {proj} only", s, s)
    run(f"W {proj} only", s, set())
    run(f"A {proj} only", set(), s)
last = {n for n in allN if ".layers.29." in n}
run("W+A layer29 only", last, last)
run("W layer29 only", last, set())
run("A layer29 only", set(), last)

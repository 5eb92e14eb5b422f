"""Which decoder linears cost FP8 W8A8 its accuracy (CPU, simulated FP8): held-out perplexity
with every linear in FP8 except one group kept in float (by projection type, or by layer).
An experiment, not a turbollm option:
`PYTHONPATH=src python bench/scripts/w8a8_fp8_sensitivity.py [WINDOWS] [--combos]` (default 1 window;
--combos: only the combined groups)."""
import sys
import time

import torch
import torch.nn.functional as F

import turbollm.quant.linear as L
from turbollm.compress.corpus import load_corpus
from turbollm.compress.evaluate import default_window, load_eval_model, make_windows, perplexity

torch.set_num_threads(2)
n_windows = int(sys.argv[1]) if len(sys.argv) > 1 and sys.argv[1].isdigit() else 1
orig_apply, orig_process = L.Fp8LinearMethod.apply, L.Fp8LinearMethod.process_weights_after_loading


def process(self, layer):
    layer._w_float = layer.weight.detach().float().clone()
    layer._fp8_off = False
    orig_process(self, layer)


def apply(self, layer, x, bias):
    if layer._fp8_off:
        return F.linear(x, layer._w_float.to(x.dtype), bias)
    return orig_apply(self, layer, x, bias)


L.Fp8LinearMethod.apply, L.Fp8LinearMethod.process_weights_after_loading = apply, process
base = load_eval_model(None)
windows = make_windows(base.tokenizer, load_corpus("shakespeare"), default_window(base.context_length), n_windows)
ref = perplexity(base, windows).perplexity
print(f"fp32: {ref:.4f}", flush=True)
del base
em = load_eval_model(None, "fp8")
linears = {n: m for n, m in em.model.named_modules() if hasattr(m, "_fp8_off")}
n_layers = 1 + max(int(n.split(".layers.")[1].split(".")[0]) for n in linears)
groups = {"none (all FP8)": []}
for proj in ("qkv_proj", "o_proj", "gate_up_proj", "down_proj"):
    groups[f"{proj} float"] = [n for n in linears if n.endswith(proj)]
for i in (0, 1, n_layers - 3, n_layers - 2, n_layers - 1):
    groups[f"layer {i} float"] = [n for n in linears if f".layers.{i}." in n]
last2 = (f".layers.{n_layers - 2}.", f".layers.{n_layers - 1}.")
groups["last 2 layers float"] = [n for n in linears if any(t in n for t in last2)]
groups[f"layer {n_layers - 1} down_proj float"] = [n for n in linears if f".layers.{n_layers - 1}.mlp.down" in n]
groups["last 2 down_proj float"] = [n for n in linears if any(t in n for t in last2) and n.endswith("down_proj")]
groups[f"layer {n_layers - 1} + every down_proj float"] = sorted(
    set(groups[f"layer {n_layers - 1} float"]) | set(groups["down_proj float"]))
groups[f"layer {n_layers - 1} + every gate_up float"] = sorted(
    set(groups[f"layer {n_layers - 1} float"]) | set(groups["gate_up_proj float"]))
if "--combos" in sys.argv:  # only the combinations
    groups = {k: v for k, v in groups.items() if "+" in k}
for name, keep in groups.items():
    for n, m in linears.items():
        m._fp8_off = n in keep
    t = time.perf_counter()
    p = perplexity(em, windows).perplexity
    print(f"{name:24s} {p:.4f} {100 * (p / ref - 1):+.2f}%  ({time.perf_counter() - t:.0f} s)", flush=True)

"""Calibrated FP8 W8A8 variants (compress/fp8_calib.py) on the embedded SmolLM2, CPU, simulated
FP8: calibrate in place, then held-out perplexity over the first WINDOWS 2048-token windows,
printed against --ref (the fp32 baseline of the same protocol, 29.5015 for 3 windows; every
run of it gives that value). An experiment driver; the product path is
`turbollm quantize --method fp8 --calibrate`. Example:
`OMP_NUM_THREADS=1 PYTHONPATH=src python bench/scripts/w8a8_fp8_calib_ablation.py --calib 16x512`
"""
import sys, time, torch, json, argparse
torch.set_num_threads(1)
from turbollm.compress.corpus import load_corpus
from turbollm.compress.evaluate import load_eval_model, make_windows, perplexity
from turbollm.compress.calibration import calibration_windows
from turbollm.compress.fp8_calib import Fp8CalibConfig, fp8_calibrate_model
ap = argparse.ArgumentParser()
ap.add_argument("--ref", type=float, default=29.501484190310634)
ap.add_argument("--nw", type=int, default=3)
ap.add_argument("--calib", default="16x512")
ap.add_argument("--search", action="store_true", help="per-row weight scale search")
ap.add_argument("--no-gptq", action="store_true")
ap.add_argument("--alpha", type=float, default=None)
ap.add_argument("--keep", default="")
ap.add_argument("--w-only", action="store_true", help="evaluate without rounding activations (after calibration)")
ap.add_argument("--act-order", action="store_true")
ap.add_argument("--damp", type=float, default=0.01)
a = ap.parse_args()
base = load_eval_model(None)
windows = make_windows(base.tokenizer, load_corpus("shakespeare"), 2048, a.nw)
n, l = map(int, a.calib.split("x"))
cw = calibration_windows(base.tokenizer, n, l)
cfg = Fp8CalibConfig(scale_search=a.search, gptq=not a.no_gptq, smooth_alpha=a.alpha,
                     keep_dense=tuple(p for p in a.keep.split(",") if p), damp=a.damp, act_order=a.act_order)
t = time.perf_counter()
fp8_calibrate_model(base.model, cw, cfg)
tc = time.perf_counter() - t
if a.w_only:  # the FP8 layers' CPU path multiplies xq.float() * scale: hand it x unrounded
    import turbollm.quant.grids as G
    G.quantize_fp8_per_token = lambda x: (x.float(), torch.ones(x.shape[0], 1))
p = perplexity(base, windows).perplexity
print(f"{' '.join(sys.argv[1:]):50s} ppl {p:.4f} {100*(p/a.ref-1):+.2f}% (calib {tc:.0f}s)", flush=True)

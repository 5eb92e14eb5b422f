"""Same-run A/B on one GPU: decode tok/s with the torch attention path vs the Triton kernels."""
import json, os, random, sys, time
import torch
import turbollm.layers.attention as attn
from turbollm import LLM, SamplingParams

KERNELS = attn.paged_kernels
llm = LLM("llama-3-8b", load_format="dummy", max_num_seqs=64, max_model_len=4096)
random.seed(0)
prompts = [[random.randrange(10, 30000) for _ in range(128)] for _ in range(64)]
sp = SamplingParams(temperature=0, max_tokens=128, ignore_eos=True)
llm.generate(prompts[:2], SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)
rows = []
for rnd in range(2):
    for mode in ("torch", "triton"):
        attn.paged_kernels = KERNELS if mode == "triton" else None
        for bs in (1, 64):
            torch.cuda.synchronize(); t = time.perf_counter()
            outs = llm.generate(prompts[:bs], sp, use_tqdm=False)
            torch.cuda.synchronize(); dt = time.perf_counter() - t
            n = sum(len(o.outputs[0].token_ids) for o in outs)
            rows.append({"round": rnd, "attention": mode, "batch": bs, "tokens": n, "seconds": dt, "tok_s": n / dt})
            print(f"round {rnd} {mode:6s} batch {bs:3d}: {n} tokens in {dt:.2f}s = {n/dt:.1f} tok/s", flush=True)
# Same greedy tokens both ways at batch 8
attn.paged_kernels = None; a = [o.outputs[0].token_ids for o in llm.generate(prompts[:8], SamplingParams(temperature=0, max_tokens=32, ignore_eos=True), use_tqdm=False)]
attn.paged_kernels = KERNELS; b = [o.outputs[0].token_ids for o in llm.generate(prompts[:8], SamplingParams(temperature=0, max_tokens=32, ignore_eos=True), use_tqdm=False)]
same = sum(x == y for x, y in zip(a, b))
print(f"greedy sequences identical torch vs triton: {same}/8")
json.dump({"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows, "same_greedy": same},
          open(os.path.join(os.environ.get("OUT", "."), "gpu_ab.json"), "w"), indent=1)

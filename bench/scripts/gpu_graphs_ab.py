"""Same-run A/B on one GPU: eager decode steps vs CUDA-graph replay (8B preset, dummy weights)."""
import json, os, random, time
import torch
from turbollm import LLM, SamplingParams

t0 = time.perf_counter()
llm = LLM("llama-3-8b", load_format="dummy", max_num_seqs=64, max_model_len=4096)
print(f"cold start incl. capture: {time.perf_counter() - t0:.1f}s", flush=True)
runner = llm.engine.executor.runner
graphs = runner.graphs
random.seed(0)
prompts = [[random.randrange(10, 30000) for _ in range(128)] for _ in range(64)]
sp = SamplingParams(temperature=0, max_tokens=128, ignore_eos=True)
rows = []
for rnd in range(2):
    for mode in ("eager", "graphs"):
        runner.graphs = graphs if mode == "graphs" else None
        for bs in (1, 64):
            torch.cuda.synchronize(); t = time.perf_counter()
            outs = llm.generate(prompts[:bs], sp, use_tqdm=False)
            torch.cuda.synchronize(); dt = time.perf_counter() - t
            n = sum(len(o.outputs[0].token_ids) for o in outs)
            rows.append({"round": rnd, "mode": mode, "batch": bs, "tokens": n, "seconds": dt, "tok_s": n / dt})
            print(f"round {rnd} {mode:6s} batch {bs:3d}: {n} tokens in {dt:.2f}s = {n/dt:.1f} tok/s", flush=True)
json.dump({"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows},
          open(os.path.join(os.environ.get("OUT", "."), "gpu_graphs_ab.json"), "w"), indent=1)

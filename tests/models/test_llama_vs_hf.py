"""Our Llama-family model against transformers: same weights -> same logits (float32, CPU).

Tolerance: max |logit difference| <= 1e-4 on random tiny configs (observed ~1e-6) and
<= 2e-3 on the 30-layer embedded model (observed ~1e-4); both far below the gaps that
decide greedy tokens.
"""

from __future__ import annotations

import pytest
import torch

from turbollm.distributed.parallel import SINGLE
from turbollm.layers.attention import AttentionMetadata
from turbollm.layers.cpu_gemm import prepack_cpu_linears
from turbollm.models.llama import LlamaForCausalLM
from turbollm.models.loader import resolve_model

BLOCK = 4  # small blocks so chunks straddle block boundaries


def run_chunks(model: LlamaForCausalLM, ids: list[int], chunks: list[int]) -> torch.Tensor:
    """Feed `ids` through the paged model in the given chunk sizes; logits for every token."""
    arch = model.arch
    nblocks = -(-len(ids) // BLOCK) + 1
    caches = [torch.zeros(2, nblocks, BLOCK, arch.num_key_value_heads, arch.head_dim)
              for _ in range(arch.num_hidden_layers)]
    # Scatter the request over blocks in reverse order to exercise the block table.
    table = list(reversed(range(nblocks)))
    out, start = [], 0
    for n in chunks:
        pos = torch.arange(start, start + n)
        meta = AttentionMetadata(
            slot_mapping=torch.tensor([table[p // BLOCK] * BLOCK + p % BLOCK for p in pos.tolist()]),
            block_tables=torch.tensor([table]),
            seq_lens=torch.tensor([start + n]),
            query_start_loc=torch.tensor([0, n]),
            query_lens_cpu=[n],
            seq_lens_cpu=[start + n],
            num_decodes=int(n == 1),
        )
        with torch.inference_mode():
            out.append(model.compute_logits(model(torch.tensor(ids[start:start + n]), pos, caches, meta)))
        start += n
    return torch.cat(out)


def load_ours(path: str, packed: bool = False) -> LlamaForCausalLM:
    src = resolve_model(path)
    model = LlamaForCausalLM(src.arch, SINGLE)
    model.load_weights(src.iter_weights())
    if packed:
        assert prepack_cpu_linears(model) > 0
    return model.eval()


@pytest.mark.parametrize("packed", [False, True], ids=["dense", "onednn"])
@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-llama3", "tiny-qwen2", "tiny-mistral"])
def test_logits_match_transformers(preset: str, packed: bool, tiny_checkpoint) -> None:  # type: ignore[no-untyped-def]
    path, hf = tiny_checkpoint(preset)
    ours = load_ours(path, packed)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, ours.arch.vocab_size, (45,), generator=g).tolist()
    with torch.inference_mode():
        ref = hf(torch.tensor([ids])).logits[0]  # [45, vocab]
    # One prefill, then chunked prefill + single-token decodes over the same tokens.
    for chunks in ([45], [7, 9, 13, 1, 1, 14]):
        got = run_chunks(ours, ids, chunks)
        err = (got - ref).abs().max().item()
        assert err <= 1e-4, f"{preset} chunks={chunks}: max logit error {err}"
        assert torch.equal(got.argmax(-1), ref.argmax(-1))


def test_presets_cover_model_features(tiny_checkpoint) -> None:  # type: ignore[no-untyped-def]
    """The parametrized configs really exercise GQA, biases, tying and rope scaling."""
    archs = {p: resolve_model(tiny_checkpoint(p)[0]).arch for p in
             ["tiny-llama", "tiny-llama3", "tiny-qwen2", "tiny-mistral"]}
    assert all(a.num_key_value_heads < a.num_attention_heads for a in archs.values())
    assert archs["tiny-qwen2"].qkv_bias
    assert archs["tiny-llama3"].tie_word_embeddings
    assert archs["tiny-llama3"].rope_scaling and archs["tiny-llama3"].rope_scaling["rope_type"] == "llama3"


def test_sliding_window_matches_transformers(tiny_checkpoint, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Mistral's window: tokens past it drop out of attention, as in transformers."""
    import json

    from transformers import AutoModelForCausalLM

    path, _ = tiny_checkpoint("tiny-mistral")
    cfg = json.load(open(f"{path}/config.json"))
    cfg["sliding_window"] = 8
    import shutil

    shutil.copytree(path, tmp_path, dirs_exist_ok=True)
    json.dump(cfg, open(tmp_path / "config.json", "w"))
    hf = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32, attn_implementation="eager").eval()
    ours = load_ours(str(tmp_path))
    assert ours.arch.sliding_window == 8
    ids = list(range(3, 33))
    with torch.inference_mode():
        ref = hf(torch.tensor([ids])).logits[0]
    for chunks in ([30], [5, 11, 1, 1, 12]):
        got = run_chunks(ours, ids, chunks)
        assert (got - ref).abs().max().item() <= 1e-4


@pytest.mark.slow
def test_embedded_smollm_logits_match_transformers(hf_smollm, smollm_tokenizer, embedded_gguf) -> None:  # type: ignore[no-untyped-def]
    ours = load_ours(embedded_gguf, packed=True)  # as the CPU engine runs it
    ids = smollm_tokenizer("The quick brown fox jumps over the lazy dog because it").input_ids
    with torch.inference_mode():
        ref = hf_smollm(torch.tensor([ids])).logits[0]
    for chunks in ([len(ids)], [5, len(ids) - 7, 1, 1]):
        got = run_chunks(ours, ids, chunks)
        err = (got - ref).abs().max().item()
        assert err <= 2e-3, f"max logit error {err}"
        assert torch.equal(got.argmax(-1), ref.argmax(-1))


@pytest.mark.parametrize("preset", ["tiny-llama3", "tiny-qwen2"])
def test_hf_twin_of_dummy_weights(preset: str) -> None:
    """Benchmarks compare dummy presets with transformers on the very same weights."""
    from turbollm.bench.hf_baseline import hf_twin
    from turbollm.models.arch import PRESETS

    ours = LlamaForCausalLM(PRESETS[preset], SINGLE)
    ours.init_dummy_weights(seed=3)
    with torch.no_grad():  # larger than N(0, 0.02) so logits differ visibly between tokens
        for p in ours.parameters():
            p.mul_(4.0)
    twin = hf_twin(ours, torch.float32, torch.device("cpu"))
    ids = list(range(5, 40))
    with torch.inference_mode():
        ref = twin(torch.tensor([ids])).logits[0]
    got = run_chunks(ours.eval(), ids, [len(ids)])
    assert (got - ref).abs().max().item() <= 1e-4

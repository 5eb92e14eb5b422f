"""The official `openai` client against a real `turbollm serve` process on loopback."""

from __future__ import annotations

import openai
import pytest

from serverutil import API_KEY, ServerProcess, metric

pytestmark = pytest.mark.slow
PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def client(shared_server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{shared_server.base_url}/v1", api_key=API_KEY, max_retries=0,
                         timeout=60)


@pytest.fixture(scope="module")
def model(client: openai.OpenAI) -> str:
    (card,) = client.models.list().data
    return card.id


def test_models_lists_the_served_model(model: str) -> None:
    assert model == "SmolLM2-135M-Instruct.Q4_1"


def test_completion_plain_and_streaming_agree(client: openai.OpenAI, model: str) -> None:
    plain = client.completions.create(model=model, prompt=PROMPT, max_tokens=12, temperature=0)
    (choice,) = plain.choices
    assert choice.text.strip() and choice.finish_reason == "length"
    assert plain.usage is not None and plain.usage.completion_tokens == 12
    assert plain.usage.prompt_tokens == 5 and plain.usage.total_tokens == 17
    chunks = list(client.completions.create(model=model, prompt=PROMPT, max_tokens=12, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == choice.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 12


def test_chat_plain_and_streaming_agree(client: openai.OpenAI, model: str) -> None:
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    plain = client.chat.completions.create(model=model, messages=msgs, max_tokens=16, temperature=0)
    (choice,) = plain.choices
    assert choice.message.role == "assistant" and "Paris" in (choice.message.content or "")
    stream = client.chat.completions.create(model=model, messages=msgs, max_tokens=16, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == choice.message.content
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens  # type: ignore[union-attr]


def test_n_choices_and_list_prompts(client: openai.OpenAI, model: str) -> None:
    out = client.completions.create(model=model, prompt=[PROMPT, "1, 2, 3,"], n=3, max_tokens=4,
                                    temperature=1.0, seed=3)
    assert sorted(c.index for c in out.choices) == list(range(6))
    assert all(c.finish_reason == "length" for c in out.choices)
    ids = client.completions.create(model=model, prompt=[504, 3458, 282, 4649, 314], max_tokens=4,
                                    temperature=0)
    assert ids.usage is not None and ids.usage.prompt_tokens == 5


def test_seed_reproducibility(client: openai.OpenAI, model: str) -> None:
    def sample(seed: int) -> list[str]:
        out = client.completions.create(model=model, prompt="Once upon a time", n=2, max_tokens=24,
                                        temperature=1.0, seed=seed)
        return [c.text for c in sorted(out.choices, key=lambda c: c.index)]

    a, b, c = sample(7), sample(7), sample(8)
    assert a == b
    assert a != c
    assert a[0] != a[1]  # the n completions of one seed differ from each other


def test_completion_logprobs_legacy_shape(client: openai.OpenAI, model: str) -> None:
    out = client.completions.create(model=model, prompt=PROMPT, max_tokens=6, temperature=0, logprobs=2)
    lp = out.choices[0].logprobs
    assert lp is not None and lp.tokens and lp.token_logprobs and lp.top_logprobs and lp.text_offset
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 6
    assert "".join(lp.tokens) == out.choices[0].text
    for tok, val, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True):
        assert val is not None and val <= 0.0
        assert 2 <= len(top) <= 3 and max(top.values()) == pytest.approx(val)  # greedy: the argmax
        assert tok in top
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(6)]


def test_chat_logprobs(client: openai.OpenAI, model: str) -> None:
    out = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hi"}],
                                         max_tokens=5, temperature=0, logprobs=True, top_logprobs=3)
    content = out.choices[0].logprobs.content  # type: ignore[union-attr]
    assert content is not None and len(content) == 5
    for entry in content:
        assert len(entry.top_logprobs) == 3 and entry.logprob == pytest.approx(entry.top_logprobs[0].logprob)


def test_stop_string_is_cut_in_plain_and_streamed_text(client: openai.OpenAI, model: str) -> None:
    full = client.completions.create(model=model, prompt="Count: one, two, three,", max_tokens=16,
                                     temperature=0).choices[0].text
    stop = full[4:9]
    assert len(stop) == 5 and stop in full
    plain = client.completions.create(model=model, prompt="Count: one, two, three,", max_tokens=16,
                                      temperature=0, stop=[stop])
    assert plain.choices[0].text == full[: full.index(stop)] and plain.choices[0].finish_reason == "stop"
    streamed = client.completions.create(model=model, prompt="Count: one, two, three,", max_tokens=16,
                                         temperature=0, stop=[stop], stream=True)
    assert "".join(c.choices[0].text for c in streamed) == plain.choices[0].text


def test_echo_prepends_the_prompt(client: openai.OpenAI, model: str) -> None:
    out = client.completions.create(model=model, prompt=PROMPT, max_tokens=3, temperature=0, echo=True)
    assert out.choices[0].text.startswith(PROMPT) and len(out.choices[0].text) > len(PROMPT)


def test_echo_with_logprobs_covers_prompt_then_completion(client: openai.OpenAI, model: str) -> None:
    plain = client.completions.create(model=model, prompt=PROMPT, max_tokens=3, temperature=0, logprobs=2)
    out = client.completions.create(model=model, prompt=PROMPT, max_tokens=3, temperature=0, logprobs=2,
                                    echo=True)
    (choice,) = out.choices
    lp, gen = choice.logprobs, plain.choices[0].logprobs
    assert lp is not None and gen is not None
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 5 + 3
    assert choice.text == PROMPT + plain.choices[0].text == "".join(lp.tokens)
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(8)]
    for val, top in zip(lp.token_logprobs[1:5], lp.top_logprobs[1:5], strict=True):
        assert val is not None and val <= 0.0 and top is not None and 2 <= len(top) <= 3
        assert max(top.values()) >= val
    assert lp.tokens[5:] == gen.tokens
    assert lp.token_logprobs[5:] == pytest.approx(gen.token_logprobs, abs=1e-4)
    streamed = [c.choices[0].logprobs for c in client.completions.create(
        model=model, prompt=PROMPT, max_tokens=3, temperature=0, logprobs=2, echo=True, stream=True)]
    assert [t for s in streamed if s for t in s.tokens] == lp.tokens
    assert [t for s in streamed if s for t in s.text_offset] == lp.text_offset


def test_echo_max_tokens_zero_scores_the_prompt_like_the_engine(client: openai.OpenAI, model: str,
                                                                embedded_gguf: str) -> None:
    """What lm-evaluation-harness sends for loglikelihood: the prompt's logprobs only."""
    ids = [504, 3458, 282, 4649, 314, 7042, 30]
    out = client.completions.create(model=model, prompt=ids, max_tokens=0, temperature=0, logprobs=1,
                                    echo=True)
    (choice,) = out.choices
    lp = choice.logprobs
    assert lp is not None and len(lp.tokens) == len(ids) and lp.token_logprobs[0] is None
    assert choice.finish_reason == "length"
    assert out.usage is not None and out.usage.completion_tokens == 0 and out.usage.prompt_tokens == len(ids)

    from turbollm import LLM, SamplingParams

    llm = LLM(embedded_gguf, device="cpu", max_model_len=512, num_blocks=64)
    (ref,) = llm.generate([ids], SamplingParams(max_tokens=1, prompt_logprobs=1), use_tqdm=False)
    assert ref.prompt_logprobs is not None
    want = sum(x.logprob for x in ref.prompt_logprobs if x is not None)
    assert sum(v for v in lp.token_logprobs if v is not None) == pytest.approx(want, abs=1e-3)


def test_tokenize_detokenize_version_health_metrics(shared_server: ServerProcess) -> None:
    with shared_server.client() as c:
        tok = c.post("/tokenize", json={"prompt": PROMPT}).json()
        assert tok["count"] == len(tok["tokens"]) == 5 and tok["max_model_len"] == 512
        assert c.post("/detokenize", json={"tokens": tok["tokens"]}).json()["prompt"] == PROMPT
        chat = c.post("/tokenize", json={"messages": [{"role": "user", "content": "Hi"}]}).json()
        assert chat["count"] > 5
        assert c.get("/version").json()["version"]
        assert c.get("/health").json() == {"status": "ok"}
        page = c.get("/metrics").text
    assert metric(page, "turbollm:generation_tokens_total") > 0
    assert metric(page, "turbollm:prompt_tokens_total") > 0
    for name in ("time_to_first_token_seconds", "inter_token_latency_seconds",
                 "e2e_request_latency_seconds", "request_queue_time_seconds"):
        assert metric(page, f"turbollm:{name}_count") > 0

"""FP8 W8A8 layers with the norm / SwiGLU writing the e4m3 activations (Fp8LinearMethod
.apply_normed / apply_activated, kernels/fp8_fused.py): exactly the unfused kernels' result
(norm or SwiGLU kernel, then fp8_linear), the route taken when it applies and skipped when
not. CPU: the route runs on CPU tensors through Triton's interpreter (tests/conftest.py sets
it up); GPU-marked: a whole FP8 model gives the same logits fused and unfused."""

from __future__ import annotations

import pytest
import torch

from turbollm.distributed.parallel import SINGLE
from turbollm.kernels import activation, fp8_fused, fp8_matmul, rmsnorm
from turbollm.layers.activation import SiluAndMul
from turbollm.layers.linear import ColumnParallelLinear, RowParallelLinear
from turbollm.layers.norm import RMSNorm
from turbollm.quant import linear as qlinear
from turbollm.quant.linear import Fp8LinearMethod

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
DTYPE = torch.bfloat16


def _layer(row: bool, k: int, n: int, bias: bool) -> ColumnParallelLinear | RowParallelLinear:
    method = Fp8LinearMethod()
    layer = RowParallelLinear(k, n, bias, SINGLE, method) if row else ColumnParallelLinear(k, [n], bias, SINGLE, method)
    g = torch.Generator().manual_seed(k + n)
    layer.weight.data = (torch.randn(n, k, generator=g) * 0.02).to(DTYPE)
    if bias:
        layer.bias.data = torch.randn(n, generator=g).to(DTYPE)
    method.process_weights_after_loading(layer)
    return layer.to(DEVICE)


@pytest.fixture
def fused_calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Route CPU tensors through the fused kernels (interpreter) and record which ran."""
    calls: list[str] = []
    monkeypatch.setattr(qlinear, "_fused_fp8_route", lambda x: True)
    for name in ("add_rmsnorm_quantize_fp8", "silu_mul_quantize_fp8"):
        fn = getattr(fp8_fused, name)
        monkeypatch.setattr(fp8_fused, name, lambda *a, _fn=fn, _name=name: (calls.append(_name), _fn(*a))[1])
    return calls


@pytest.mark.parametrize("m", [1, 6])
@pytest.mark.parametrize("with_residual", [True, False])
def test_normed_equals_norm_then_fp8_linear(fused_calls: list[str], m: int, with_residual: bool) -> None:
    layer = _layer(False, 96, 40, bias=True)
    norm = RMSNorm(96, 1e-5).to(DEVICE)
    norm.weight.data = (1 + 0.2 * torch.randn(96, generator=torch.Generator().manual_seed(2))).to(DTYPE).to(DEVICE)
    x = torch.randn(m, 96, generator=torch.Generator().manual_seed(m)).to(DTYPE).to(DEVICE)
    res = torch.randn(m, 96, generator=torch.Generator().manual_seed(9)).to(DTYPE).to(DEVICE) if with_residual else None
    y, s = layer.forward_normed(x, res, norm)
    assert fused_calls == ["add_rmsnorm_quantize_fp8"]
    h, s_ref = rmsnorm.fused_add_rmsnorm(x, res, norm.weight, norm.eps)
    y_ref = fp8_matmul.fp8_linear(h, layer.weight, layer.weight_scale, layer.bias)
    assert torch.equal(y, y_ref) and torch.equal(s, s_ref)
    if res is None:
        assert s is x


@pytest.mark.parametrize("bias", [False, True])
def test_activated_equals_silu_then_fp8_linear(fused_calls: list[str], bias: bool) -> None:
    layer = _layer(True, 80, 48, bias=bias)
    gate_up = torch.randn(5, 160, generator=torch.Generator().manual_seed(3)).to(DTYPE).to(DEVICE)
    y = layer.forward_activated(gate_up, SiluAndMul())
    assert fused_calls == ["silu_mul_quantize_fp8"]
    y_ref = fp8_matmul.fp8_linear(activation.silu_and_mul(gate_up), layer.weight, layer.weight_scale)
    if bias:
        y_ref = y_ref + layer.bias
    assert torch.equal(y, y_ref)


def test_route_skipped_where_it_does_not_apply(fused_calls: list[str]) -> None:
    """A norm in another dtype than x, or another activation, keeps the unfused pair."""
    layer = _layer(False, 64, 32, bias=False)
    x = torch.randn(2, 64, generator=torch.Generator().manual_seed(1)).to(DTYPE).to(DEVICE)
    norm = RMSNorm(64, 1e-5).to(DEVICE)  # float32 weight, bf16 x
    assert Fp8LinearMethod().apply_normed(layer, x, None, norm, None) is None
    row = _layer(True, 32, 16, bias=False)
    assert Fp8LinearMethod().apply_activated(row, torch.ones(2, 64, dtype=DTYPE, device=DEVICE),
                                             torch.nn.GELU()) is None
    assert fused_calls == []


def test_cpu_route_off_without_cuda() -> None:
    """Unpatched, CPU tensors never take the Triton route (the CPU simulation runs instead)."""
    assert not qlinear._fused_fp8_route(torch.ones(1, 4))


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("tokens", [1, 40, 300])
def test_gpu_model_logits_equal_fused_and_unfused(monkeypatch: pytest.MonkeyPatch, tokens: int) -> None:
    """A dummy FP8 Llama's prefill logits are bit-equal with the route on and off (decode rows
    through the small-M kernel, prompt rows through torch._scaled_mm)."""
    from turbollm.engine.llm import LLM
    from turbollm.sampling_params import SamplingParams

    # No prefix cache: the second run must compute the same prompt rows as the first (a cache
    # hit would leave it a short remainder, which takes the small-M kernel instead).
    llm = LLM("tiny-llama3", load_format="dummy", quantization="fp8", gpu_memory_utilization=0.3,
              enforce_eager=True, enable_prefix_caching=False)
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True, logprobs=5)
    prompt = [[3 + i % 250 for i in range(tokens)]]  # ids inside the preset's 256-token vocabulary
    fused = llm.generate(prompt, params, use_tqdm=False)[0].outputs[0]
    monkeypatch.setattr(qlinear, "_fused_fp8_route", lambda x: False)
    plain = llm.generate(prompt, params, use_tqdm=False)[0].outputs[0]
    assert fused.token_ids == plain.token_ids
    assert fused.logprobs == plain.logprobs

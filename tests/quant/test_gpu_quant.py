"""GPU: the quantized linears (Triton kernels when present, else the torch fallback; FP8
through torch._scaled_mm) against float32 references on bf16 activations."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from turbollm.distributed.parallel import SINGLE
from turbollm.layers.linear import ColumnParallelLinear, RowParallelLinear
from turbollm.quant import grids
from turbollm.quant.linear import Fp8LinearMethod, Int4LinearMethod, Int8LinearMethod, fp8_linear_simulated
from turbollm.quant.methods import Fp8Config, check_device_support

pytestmark = pytest.mark.gpu
SHAPES = [(1, 4096, 4096), (16, 4096, 11008), (64, 11008, 4096), (300, 576, 1536)]  # (M, K, N)


def _layer(method, k: int, n: int, row: bool, bias: bool):  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    with torch.device("cuda"):
        old = torch.get_default_dtype()
        torch.set_default_dtype(torch.bfloat16)
        try:
            layer = (RowParallelLinear(k, n, bias, SINGLE, method) if row
                     else ColumnParallelLinear(k, [n // 2, n - n // 2], bias, SINGLE, method))
        finally:
            torch.set_default_dtype(old)
        w = (torch.randn(n, k) * 0.02).to(torch.bfloat16)
        layer.weight.data.copy_(w)
        if bias:
            layer.bias.data.normal_()
    method.process_weights_after_loading(layer)
    return layer, w


@pytest.mark.parametrize("m,k,n", SHAPES)
@pytest.mark.parametrize("kind", ["int8", "int4-g128", "int4-g64"])
def test_weight_only_linears_match_reference(kind: str, m: int, k: int, n: int) -> None:
    if kind == "int4-g128" and k % 128:
        pytest.skip("group 128 does not divide K")
    method = Int8LinearMethod() if kind == "int8" else Int4LinearMethod(int(kind[-3:].lstrip("g")))
    layer, _ = _layer(method, k, n, row=(m == 1), bias=(m != 1))
    if kind != "int8":
        assert layer.int4_integer_zeros  # RTN: the tensor-core path skips the fractional-zero correction
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    if kind == "int8":
        w_hat = grids.dequantize_int8(layer.qweight, layer.scales)
    else:
        w_hat = grids.dequantize_int4(grids.unpack_int4(layer.qweight), layer.scales, layer.zeros, method.group_size)
    ref = F.linear(x.float(), w_hat, None if layer.bias is None else layer.bias.float())
    got = layer(x)
    assert got.dtype == torch.bfloat16 and got.shape == (m, n)
    err = (got.float() - ref).abs().max().item()
    assert err <= 2e-2 * ref.abs().max().item() + 1e-2, err


@pytest.mark.parametrize("m,k,n", SHAPES)
def test_fp8_scaled_mm_matches_simulation(m: int, k: int, n: int) -> None:
    check_device_support(Fp8Config(), torch.device("cuda"))  # skips nothing: H100 has FP8
    layer, w = _layer(Fp8LinearMethod(), k, n, row=False, bias=True)
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    got = layer(x)
    sim = fp8_linear_simulated(x.float(), layer.weight, layer.weight_scale, layer.bias.float())
    dense = F.linear(x.float(), w.float(), layer.bias.float())
    assert got.dtype == torch.bfloat16
    assert (got.float() - sim).abs().max().item() <= 2e-2 * sim.abs().max().item() + 1e-2
    # and W8A8 stays near the bf16 product (e4m3: ~6% per element, averaged over K)
    assert ((got.float() - dense).norm() / dense.norm()).item() < 0.05


@pytest.mark.parametrize("quantization", ["int8", "int4", "fp8"])
def test_quantized_dummy_model_generates_on_gpu(quantization: str) -> None:
    from turbollm.engine.llm import LLM
    from turbollm.sampling_params import SamplingParams

    llm = LLM("tiny-llama3", load_format="dummy", quantization=quantization, group_size=32,
              gpu_memory_utilization=0.3)
    outs = llm.generate([list(range(5, 30))], SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True),
                        use_tqdm=False)
    assert len(outs[0].outputs[0].token_ids) == 16


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_quantized_lm_head_on_gpu(method: str) -> None:
    """quantize_lm_head on the GPU: one row through the quantized GEMV, more through the
    quantized matmul, both against the float32 product with the RTN weight."""
    from turbollm.engine.llm import LLM

    llm = LLM("tiny-llama", load_format="dummy", quantization=method, group_size=32, quantize_lm_head=True)
    model = llm.engine.executor.runner.model
    head = model.lm_head.quantized
    assert head is not None and model.lm_head.weight.numel() == 0
    w_hat = head.quant_method.dense_weight(head).float()  # [vocab, hidden]
    for rows in (1, 7):
        hidden = torch.randn(rows, w_hat.shape[1], device="cuda", dtype=torch.bfloat16)
        ref = hidden.float() @ w_hat.t()
        got = model.compute_logits(hidden)
        assert got.shape == ref.shape
        err = (got.float() - ref).abs().max().item()
        assert err <= 2e-2 * ref.abs().max().item() + 1e-2, (rows, err)

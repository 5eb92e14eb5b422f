"""HF AutoAWQ (GEMM) and GPTQ 4-bit checkpoints load to the same logits as the dense model
holding the same W_hat. Synthetic checkpoints: RTN grids packed into each layout here."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import save_file

from turbollm.models.build import build_model
from turbollm.models.loader import resolve_model
from turbollm.quant import grids, hf_formats
from turbollm.quant.plan import resolve_quantization

G = 32
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def test_layout_packers_are_inverse() -> None:
    v = torch.randint(0, 16, (16, 40))
    assert torch.equal(hf_formats.unpack_awq_cols(hf_formats.pack_awq_cols(v)), v)
    assert torch.equal(hf_formats.unpack_seq_cols(hf_formats.pack_seq_cols(v)), v)
    assert torch.equal(hf_formats.unpack_gptq_rows(hf_formats.pack_gptq_rows(v)), v)
    # AutoAWQ's order: nibble i holds column (0, 2, 4, 6, 1, 3, 5, 7)[i] of its 8.
    one = torch.zeros(1, 8, dtype=torch.int64)
    one[0, 2] = 5
    assert int(hf_formats.pack_awq_cols(one)) == 5 << 4


def _quantized_linear(w: torch.Tensor, perm: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """RTN int4 of W's columns taken in `perm` order: (q_orig [N, K], s, z [N, K/G], W_hat [N, K])."""
    q_p, s, z = grids.quantize_int4(w[:, perm], G, scale_dtype=torch.float16)
    w_hat = torch.empty_like(w)
    w_hat[:, perm] = grids.dequantize_int4(q_p, s, z, G)
    q = torch.empty_like(q_p)
    q[:, perm] = q_p
    return q, s, z, w_hat


def _write(src: str, dst: str, tensors: dict[str, torch.Tensor], qcfg: dict | None) -> str:
    os.makedirs(dst)
    cfg = json.load(open(os.path.join(src, "config.json")))
    if qcfg is not None:
        cfg["quantization_config"] = qcfg
    json.dump(cfg, open(os.path.join(dst, "config.json"), "w"))
    save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(dst, "model.safetensors"))
    return dst


def _make_pair(tiny_checkpoint, tmp_path, fmt: str, act_order: bool) -> tuple[str, str]:  # type: ignore[no-untyped-def]
    """(dense checkpoint with W_hat, the same weights in the HF 4-bit layout `fmt`)."""
    path, hf = tiny_checkpoint("tiny-llama")
    sd = {k: v.detach().clone() for k, v in hf.state_dict().items()}
    gen = torch.Generator().manual_seed(7)
    perms = {}
    dense, packed = dict(sd), {k: v for k, v in sd.items() if not k.endswith(tuple(f"{n}.weight" for n in LINEARS))}
    for name, w in sd.items():
        leaf = name.rsplit(".", 2)[-2]
        if leaf not in LINEARS:
            continue
        k = w.shape[1]
        if k not in perms:  # one permutation per input width: merged parts share their input
            perms[k] = torch.randperm(k, generator=gen) if act_order else torch.arange(k)
        perm = perms[k]
        w = w.clone()
        w[:, perm[:G]] = w[:, perm[:G]].abs()  # a group with min >= 0 -> zero point 0
        q, s, z, w_hat = _quantized_linear(w, perm)
        dense[name] = w_hat
        prefix = name.removesuffix(".weight")
        if fmt == "awq":
            packed[f"{prefix}.qweight"] = hf_formats.pack_awq_cols(q.t())
            packed[f"{prefix}.qzeros"] = hf_formats.pack_awq_cols(z.t().to(torch.int64))
        else:
            g_idx = torch.empty(k, dtype=torch.int32)
            g_idx[perm] = (torch.arange(k) // G).to(torch.int32)
            packed[f"{prefix}.qweight"] = hf_formats.pack_gptq_rows(q.t())
            packed[f"{prefix}.qzeros"] = hf_formats.pack_seq_cols(((z.t().to(torch.int64) - 1) % 16))
            packed[f"{prefix}.g_idx"] = g_idx
        packed[f"{prefix}.scales"] = s.t().to(torch.float16)
    qcfg = ({"quant_method": "awq", "bits": 4, "group_size": G, "zero_point": True, "version": "gemm"}
            if fmt == "awq" else
            {"quant_method": "gptq", "bits": 4, "group_size": G, "desc_act": act_order, "sym": False})
    return (_write(path, str(tmp_path / "dense"), dense, None),
            _write(path, str(tmp_path / fmt), packed, qcfg))


def _logits(path: str) -> torch.Tensor:
    src = resolve_model(path)
    plan = resolve_quantization(None, 128, src.quantization_config, torch.device("cpu"))
    model = build_model(src, torch.device("cpu"), torch.float32, quantization=plan)
    from tests_support import run_prefill

    return run_prefill(model, list(range(3, 40)))


@pytest.mark.parametrize("fmt,act_order", [("awq", False), ("gptq", False), ("gptq", True)])
def test_hf_4bit_checkpoint_matches_dense_w_hat(fmt: str, act_order: bool, tiny_checkpoint, tmp_path) -> None:  # type: ignore[no-untyped-def]
    dense, quant = _make_pair(tiny_checkpoint, tmp_path, fmt, act_order)
    ref, got = _logits(dense), _logits(quant)
    assert (got - ref).abs().max().item() <= 1e-4
    src = resolve_model(quant)
    plan = resolve_quantization(None, 128, src.quantization_config, torch.device("cpu"))
    assert plan is not None and plan.config.group_size == G and plan.config.act_order == act_order


def test_unsupported_hf_quantization_is_a_clear_error(tiny_checkpoint, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from turbollm.errors import ModelLoadError

    path, _ = tiny_checkpoint("tiny-llama")
    shutil.copytree(path, tmp_path / "c")
    cfg = json.load(open(tmp_path / "c" / "config.json"))
    for qcfg, msg in [({"quant_method": "awq", "bits": 3, "group_size": 32}, "bits=3"),
                      ({"quant_method": "gptq", "bits": 4, "group_size": -1}, "group_size"),
                      ({"quant_method": "bitsandbytes"}, "not supported")]:
        cfg["quantization_config"] = qcfg
        json.dump(cfg, open(tmp_path / "c" / "config.json", "w"))
        src = resolve_model(str(tmp_path / "c"))
        with pytest.raises(ModelLoadError, match=msg):
            resolve_quantization(None, 128, src.quantization_config, torch.device("cpu"))

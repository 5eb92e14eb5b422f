"""GGUF files written as llama.cpp's converter writes them, for the tests that read them back
(tests/models/test_loader.py, tests/quant/test_gguf_formats.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from gguf import GGUFWriter

from turbollm.models.arch import ModelArch


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py LlamaModel.permute: rotate-half rows → interleaved pairs."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def arch_writer(path: Path, arch: ModelArch, gguf_arch: str = "llama") -> GGUFWriter:
    """A GGUFWriter holding the architecture's metadata under llama.cpp's keys."""
    w = GGUFWriter(str(path), gguf_arch)
    w.add_block_count(arch.num_hidden_layers)
    w.add_context_length(arch.max_position_embeddings)
    w.add_embedding_length(arch.hidden_size)
    w.add_feed_forward_length(arch.intermediate_size)
    w.add_head_count(arch.num_attention_heads)
    w.add_head_count_kv(arch.num_key_value_heads)
    w.add_rope_dimension_count(arch.head_dim)
    w.add_rope_freq_base(arch.rope_theta)
    w.add_layer_norm_rms_eps(arch.rms_norm_eps)
    w.add_vocab_size(arch.vocab_size)
    return w


def finish(w: GGUFWriter) -> None:
    """Write the header, metadata and tensors, and close the file."""
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()

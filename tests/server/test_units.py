"""Fast checks of the server's pure pieces (no model, no process)."""

from __future__ import annotations

import pytest

from turbollm.server.errors import error_body
from turbollm.server.options import ServerOptions
from turbollm.server.streaming import TextHoldback, sse


def test_holdback_never_sends_a_prefix_of_a_stop_string() -> None:
    # The engine's cumulative text as it grows; at the end it cut "STOP" and finished.
    h = TextHoldback(["STOP"])
    sent = [h.delta("Hello S", False), h.delta("Hello ST", False), h.delta("Hello STO", False)]
    sent.append(h.delta("Hello ", True))
    assert "".join(sent) == "Hello "
    assert all("S" not in piece for piece in sent)


def test_holdback_without_stop_strings_sends_everything_at_once() -> None:
    h = TextHoldback([])
    assert h.delta("ab", False) == "ab" and h.delta("abc", False) == "c" and h.delta("abc", True) == ""


def test_holdback_releases_held_text_on_finish() -> None:
    h = TextHoldback(["\n\nUser:"])
    assert h.delta("Hi there", False) == "Hi"
    assert h.delta("Hi there", True) == " there"


def test_error_body_scrubs_addresses_and_has_openai_shape() -> None:
    body = error_body(400, "bad <object at 0x7f3a2b4c5d6e>", param="n")
    assert body == {"error": {"message": "bad <object at 0x…>", "type": "invalid_request_error",
                              "param": "n", "code": None}}
    assert sse({"a": 1}) == b'data: {"a":1}\n\n'


@pytest.mark.parametrize("bad", [{"max_n": 0}, {"max_logprobs": 21}, {"api_key": ""},
                                 {"shutdown_timeout": -1}, {"max_queue": -1}])
def test_server_options_reject_bad_values(bad: dict[str, object]) -> None:
    with pytest.raises(ValueError, match=next(iter(bad))):
        ServerOptions(**bad)  # type: ignore[arg-type]


def test_metrics_export_speculative_decoding() -> None:
    from turbollm.core.scheduler import SchedulerStats
    from turbollm.core.spec_policy import SpecCounters
    from turbollm.server.metrics import ServerMetrics

    spec = SpecCounters()
    spec.record(4, 2)
    spec.record(4, 4)
    stats = SchedulerStats(1, 0, 0, 0.1, 10, 0, 0, spec=spec)
    text = ServerMetrics(lambda: stats).render().decode()
    assert "turbollm:spec_decode_num_draft_tokens_total 8.0" in text
    assert "turbollm:spec_decode_num_accepted_tokens_total 6.0" in text
    assert "turbollm:spec_decode_mean_accepted_length 4.0" in text  # (3 + 5) / 2
    assert 'turbollm:spec_decode_acceptance_by_position{position="3"} 0.5' in text
    off = SchedulerStats(1, 0, 0, 0.1, 10, 0, 0)
    assert "spec_decode" not in ServerMetrics(lambda: off).render().decode()


def test_startup_heap_is_frozen_out_of_full_collections() -> None:
    import gc

    from turbollm.server.launcher import freeze_startup_heap

    kept = [[i] for i in range(1000)]  # objects alive at "start-up"
    try:
        freeze_startup_heap()
        assert gc.get_freeze_count() >= len(kept)
        assert not any(o is kept[0] for o in gc.get_objects())  # the frozen are not walked
    finally:
        gc.unfreeze()

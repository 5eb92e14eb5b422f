"""Logits to tokens and logprobs: the last stage of a step, run by the worker.

`Sampler` takes the model's last-position logits (on the GPU, or CPU in tests) and the
per-request `SamplingState` the worker keeps on the host, and returns plain Python token ids
and logprobs after a single device-to-host copy.
"""

from turbollm.sample.sampler import Sampler, SamplerOutput, SamplingState

__all__ = ["Sampler", "SamplerOutput", "SamplingState"]

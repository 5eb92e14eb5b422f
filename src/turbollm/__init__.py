"""turbollm: a fast, hackable inference engine for Llama-family LLMs."""

from turbollm.sampling_params import SamplingParams

__version__ = "0.1.0"
__all__ = ["LLM", "SamplingParams", "__version__"]


def __getattr__(name: str):
    # LLM pulls in torch and transformers; import it lazily so `turbollm --help`
    # and the torch-free core stay quick to import.
    if name == "LLM":
        from turbollm.engine.llm import LLM

        return LLM
    raise AttributeError(name)

"""Exceptions a user can cause. Each names the bad value; the CLI prints one line for them.

All derive from TurbollmError so callers can catch the family; each also derives from the
builtin that best describes it (ValueError, FileNotFoundError) so generic handlers still work.
"""


class TurbollmError(Exception):
    """Base class of every error turbollm raises for bad user input."""


class ModelLoadError(TurbollmError, ValueError):
    """A checkpoint, GGUF file or preset could not be loaded (malformed, unsupported, unknown)."""


class ModelNotFoundError(ModelLoadError, FileNotFoundError):
    """The named model path does not exist and is not a known preset."""


class PromptTooLongError(TurbollmError, ValueError):
    """A prompt (plus the tokens it asks for) does not fit the model's context or the KV cache."""

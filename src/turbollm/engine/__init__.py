"""The engine: requests in, outputs out (LLMEngine), and the offline `LLM` API."""

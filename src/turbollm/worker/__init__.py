"""The only place requests meet tensors: inputs, KV cache, model runner, executor."""

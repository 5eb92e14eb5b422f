"""Building blocks of the decoder: parallel-aware linears, attention, rotary, norms."""

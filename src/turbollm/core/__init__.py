"""Scheduling, KV block accounting and request state: plain Python, never torch."""

"""Benchmark drivers behind `turbollm bench` (each compares against a same-run baseline)."""

"""Latency/throughput harness for vidrank (``python -m benchmarks.run``) and the multi-replica
rollout (``python -m benchmarks.rollout``); ``benchmarks.harness`` (ports, server processes,
nginx, /rank bodies) is shared with the tests."""

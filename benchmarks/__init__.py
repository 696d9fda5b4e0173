"""Latency/throughput harness for vidrank (``python -m benchmarks.run``); not part of the tests."""

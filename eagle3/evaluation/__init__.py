"""The benchmark harness: suites, per-method runs, batch sizes."""

"""The benchmark harness: runner (model x recipe x prompts x seeds), metrics, reports, plots."""

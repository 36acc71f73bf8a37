"""infer-conformance: the shared backend suite, fixtures, goldens and the numpy reference forward."""

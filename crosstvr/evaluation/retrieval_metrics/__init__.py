"""The `evaluate` module of retrieval metrics: `evaluate.load(<this folder>)`."""

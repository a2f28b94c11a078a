"""Storage: fsspec I/O with atomic commits, and the run's folder layout."""

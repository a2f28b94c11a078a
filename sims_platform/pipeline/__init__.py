"""The local pipeline runner (the Kubernetes driver runs the same stages as workloads)."""

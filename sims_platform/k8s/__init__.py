"""Kubernetes layer: build each stage's workload, drive the pipeline on a cluster, report its status."""

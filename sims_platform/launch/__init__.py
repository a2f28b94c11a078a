"""Launchers: where a stage runs (local processes, torchrun, loopback services); the stages stay the same."""

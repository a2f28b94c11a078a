"""Training: the resumable loop and its checkpoints at storage URIs."""

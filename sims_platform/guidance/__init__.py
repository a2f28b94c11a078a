"""Guidance methods: the method table (methods.py), the one place each method is defined."""

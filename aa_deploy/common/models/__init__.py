"""Architectures aa-deploy ships itself, for its bundled trained weights."""

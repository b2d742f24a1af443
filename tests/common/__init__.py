"""Shared plumbing and the bundled material: the bundled models and images, threads (aa_deploy/common)."""

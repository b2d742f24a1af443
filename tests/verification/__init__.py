"""The parity gate and the twin on real architectures (aa_deploy/verification)."""

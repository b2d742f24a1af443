"""Shift consistency: protocols, the gate, oscillation (aa_deploy/consistency)."""

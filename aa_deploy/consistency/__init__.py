"""Shift consistency: does the prediction stay put when the image moves?"""

from aa_deploy.consistency.protocols import circular_agreement, top1

__all__ = ["circular_agreement", "top1"]

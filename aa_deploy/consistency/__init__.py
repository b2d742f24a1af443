"""Shift consistency: does the prediction stay put when the image moves?"""

from aa_deploy.consistency.protocols import PROTOCOLS, ConsistencyResult, measure, wilson

__all__ = ["PROTOCOLS", "ConsistencyResult", "measure", "wilson"]

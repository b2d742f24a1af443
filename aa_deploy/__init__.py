"""aa-deploy: make deployed vision models shift-invariant again.

Inserts fixed blur filters at every downsampling site of an ONNX model (Zhang, ICML 2019), with a
PyTorch twin of the same transformation as the reference for parity checks.
"""

from aa_deploy.convert import Conversion, convert, convert_model, inspect
from aa_deploy.errors import InputError
from aa_deploy.parity import ParityResult, verify
from aa_deploy.plan import Action, Options
from aa_deploy.version import __version__

__all__ = [
    "Action",
    "Conversion",
    "InputError",
    "ParityResult",
    "Options",
    "__version__",
    "convert",
    "convert_model",
    "inspect",
    "verify",
]

"""aa-deploy: make deployed vision models shift-invariant again.

Inserts fixed blur filters at every downsampling site of an ONNX model (Zhang, ICML 2019), with a
PyTorch twin of the same transformation as the reference for parity checks.

`verify` and `ParityResult` load on first use: the graph pass does not need torch, and importing
the package (or one module of its graph core) should not pay for it.
"""

from importlib import import_module

from aa_deploy.convert import Conversion, convert, convert_model, inspect
from aa_deploy.errors import InputError
from aa_deploy.plan import Action, Options
from aa_deploy.version import __version__

_LAZY = {"ParityResult": "aa_deploy.comparator", "verify": "aa_deploy.parity"}

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


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'aa_deploy' has no attribute {name!r}")

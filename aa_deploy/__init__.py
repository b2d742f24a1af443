"""aa-deploy: make deployed vision models shift-invariant again.

Inserts fixed blur filters at every downsampling site of an ONNX model (Zhang, ICML 2019), with a
PyTorch twin of the same transformation as the reference for parity checks.

`verify` and `ParityResult` load on first use: the graph pass does not need torch, and importing
the package (or one module of its graph core) should not pay for it.
"""

from importlib import import_module

from aa_deploy.common.errors import InputError
from aa_deploy.common.version import __version__
from aa_deploy.conversion.graph_pass import AntiAliasPass, Conversion, convert, convert_model, inspect
from aa_deploy.conversion.plan import Action, Options

_LAZY = {"ParityResult": "aa_deploy.verification.comparator", "verify": "aa_deploy.verification.parity"}

__all__ = [
    "Action",
    "AntiAliasPass",
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

"""aa-deploy: make deployed vision models shift-invariant again.

Inserts fixed blur filters at every downsampling site of an ONNX model (Zhang, ICML 2019), with a
PyTorch twin of the same transformation as the reference for parity checks.

Every name loads on first use: the graph pass does not need torch, importing one module of the graph
core should not pay for the rest, and the command line's entry point (`aa_deploy.entry`) imports
nothing heavy before it can answer Ctrl-C in one line.
"""

from importlib import import_module

from aa_deploy.errors import InputError
from aa_deploy.version import __version__

_LAZY = {
    "Conversion": "aa_deploy.convert",
    "convert": "aa_deploy.convert",
    "convert_model": "aa_deploy.convert",
    "inspect": "aa_deploy.convert",
    "Action": "aa_deploy.plan",
    "Options": "aa_deploy.plan",
    "ParityResult": "aa_deploy.parity",
    "verify": "aa_deploy.parity",
}

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

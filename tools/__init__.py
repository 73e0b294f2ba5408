"""Tools: the Python API and the ``bitpass`` command-line driver (as LLVM's tools/ holds opt and llc)."""

from bitpass.tools.api import Artifact, compile, open_artifact, run, verify

__all__ = ["Artifact", "compile", "open_artifact", "run", "verify"]

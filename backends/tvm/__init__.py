"""The TVM backend: Relax modules built from bitpass's annotated IR, with bitpass's own TIR schedules."""

from bitpass.backends.tvm.backend import TvmBackend

__all__ = ["TvmBackend"]

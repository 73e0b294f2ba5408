"""Run an ONNX model with ONNX Runtime's CPU execution provider (sessions built by ``bitpass.passes.execution``)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from bitpass.backends.base import Runner
from bitpass.frontend.errors import BitpassError
from bitpass.passes.execution import DEFAULT_SESSION, create_session, session_options

__all__ = ["DEFAULT_SESSION", "OrtRunner", "session_options"]


class OrtRunner(Runner):
    """A loaded ONNX Runtime session; feeds by input name, outputs in graph order."""

    def __init__(self, session: ort.InferenceSession) -> None:
        self.session = session
        self.input_names = [i.name for i in session.get_inputs()]
        self.output_names = [o.name for o in session.get_outputs()]

    @classmethod
    def from_bytes(cls, model: bytes, *, config: Mapping[str, Any] | None = None,
                   threads: int | None = None, for_timing: bool = False) -> OrtRunner:
        return cls(create_session(model, config=config, threads=threads, for_timing=for_timing))

    @classmethod
    def from_path(cls, path: Path, *, config: Mapping[str, Any] | None = None, threads: int | None = None,
                  for_timing: bool = False) -> OrtRunner:
        """A session loaded by path: ONNX Runtime reads external data from beside the file."""
        return cls(create_session(path, config=config, threads=threads, for_timing=for_timing))

    @classmethod
    def from_directory(cls, directory: Path, *, threads: int | None = None, for_timing: bool = False) -> OrtRunner:
        config_path = directory / "session.json"
        config = json.loads(config_path.read_text()) if config_path.is_file() else None
        return cls.from_bytes((directory / "model.onnx").read_bytes(), config=config, threads=threads,
                              for_timing=for_timing)

    def run(self, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        try:
            return list(self.session.run(None, {n: feeds[n] for n in self.input_names}))
        except KeyError as err:
            raise BitpassError(f"missing input {err.args[0]!r}; the model takes {', '.join(self.input_names)}") \
                from err

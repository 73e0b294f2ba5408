"""Backends: code generation per runtime and target, the artifact writer and its measurements."""

"""Plugins: the registry of passes, backends and named pipelines, discovered from entry points."""

from bitpass.plugins.registry import Broken, Entry, Registry, RegistryError, default_registry

__all__ = ["Broken", "Entry", "Registry", "RegistryError", "default_registry"]

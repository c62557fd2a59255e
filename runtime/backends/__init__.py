"""Backends: one narrow runner interface (`Backend`), registered by name."""
from eqr.runtime.backends.base import Backend
from eqr.runtime.backends.registry import AUTO, backend_names, create_backend, register_backend

__all__ = ["AUTO", "Backend", "backend_names", "create_backend", "register_backend"]

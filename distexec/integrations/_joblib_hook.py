"""Registers the joblib backend ``"distexec"`` whenever joblib is imported, without importing it.

Owns the registration only; the backend is :mod:`distexec.integrations.joblib_backend`.
Imports the standard library only, so ``import distexec`` stays as fast as it was whether or not
joblib is installed.

joblib (1.4-1.6) has no entry-point lookup for backends: a backend exists once someone calls
``joblib.register_parallel_backend``. So :func:`install` (called by ``import distexec``)

    joblib already imported ──► register now
    joblib not imported yet ──► a finder at the front of ``sys.meta_path`` that answers for the
                                 name "joblib" only: it lets the usual finders find it, and after
                                 joblib's module body has run, registers and removes itself

The registered factory imports the backend module on first use, so importing joblib costs one
dictionary entry, and an incompatible joblib fails when the backend is asked for, with joblib's
own error, rather than when joblib is imported.
"""

from __future__ import annotations

import sys
import threading

__all__ = ["install", "BACKEND_NAME"]

BACKEND_NAME = "distexec"
_lock = threading.Lock()


def install() -> None:
    """Make ``joblib.parallel_config(backend="distexec")`` work, now or once joblib is imported."""
    joblib = sys.modules.get("joblib")
    if joblib is not None and hasattr(joblib, "register_parallel_backend"):
        register(joblib)
        return
    with _lock:
        if not any(isinstance(finder, _JoblibWatcher) for finder in sys.meta_path):
            sys.meta_path.insert(0, _JoblibWatcher())


def register(joblib) -> None:
    """Register the lazy factory with ``joblib``, unless a backend of that name exists already.

    A user's own registration under the same name wins: it is never replaced.
    """
    backends = getattr(getattr(joblib, "parallel", None), "BACKENDS", {})
    if BACKEND_NAME not in backends:
        joblib.register_parallel_backend(BACKEND_NAME, make_backend)


def make_backend(**kwargs):
    """The factory joblib calls for ``backend="distexec"``: ``DistexecBackend(**kwargs)``."""
    from .joblib_backend import DistexecBackend

    return DistexecBackend(**kwargs)


class _JoblibWatcher:
    """A ``sys.meta_path`` finder that only watches for the import of the package ``joblib``.

    It finds nothing itself: it asks the finders after it, then wraps the loader's
    ``exec_module`` on that one spec so that the registration runs right after joblib's
    ``__init__`` has executed.
    """

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "joblib":
            return None
        spec = _find_with_other_finders(self, fullname, path, target)
        loader = getattr(spec, "loader", None)
        if loader is None or not hasattr(loader, "exec_module"):
            return spec
        original = loader.exec_module

        def exec_module(module):
            try:
                original(module)
            finally:
                _restore(loader, original)
            if module.__name__ == "joblib":
                _uninstall()
                register(module)

        try:
            loader.exec_module = exec_module  # this spec's loader instance only
        except AttributeError:  # a loader with __slots__: give up quietly, joblib still works
            pass
        return spec


def _find_with_other_finders(watcher, fullname, path, target):
    for finder in list(sys.meta_path):
        find_spec = getattr(finder, "find_spec", None)
        if finder is watcher or find_spec is None:
            continue
        spec = find_spec(fullname, path, target)
        if spec is not None:
            return spec
    return None


def _restore(loader, original) -> None:
    try:
        del loader.exec_module  # back to the class's method
    except AttributeError:
        loader.exec_module = original


def _uninstall() -> None:
    with _lock:
        sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _JoblibWatcher)]

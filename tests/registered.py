"""A plugin registered with surgeon's plugin manager for the duration of a `with` block (tests only)."""
from contextlib import contextmanager

from surgeon import registry


@contextmanager
def plugin(obj, name):
    pm = registry.get_plugin_manager()
    pm.register(obj, name=name)
    try:
        yield
    finally:
        pm.unregister(name=name)

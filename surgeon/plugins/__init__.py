"""Built-in plugins: thin glue registering surgeon's layers, site finders and model sources.

They load through the same plugin manager path as third-party plugins (`registry.DEFAULT_PLUGINS`).
"""

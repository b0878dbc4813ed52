"""Model backends, one module per family; each registers its names on import.

Modules starting with `_` hold shared pieces and register nothing.
"""

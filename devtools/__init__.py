"""Tools for developing move.py: not part of the product (see sandbox.py)."""

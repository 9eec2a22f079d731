"""The built-in plugins of diffusion-toolkit.

They are registered through the ``dtk`` entry-point group in ``pyproject.toml``, exactly
like third-party plugins; the core (`toolkit`) never imports this package by name.
"""

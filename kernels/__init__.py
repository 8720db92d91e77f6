"""Fused kernels, imported as `cocodc.kernels` (pyproject maps this folder there).

The folder is not a top-level package named `kernels`: that name belongs to another library.
"""

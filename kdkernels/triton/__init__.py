"""Triton kernels (@triton.jit only) and their launchers (checks, allocation, grid)."""

"""Triton kernels for LASER's hot paths, installed as `laser_triton.kernels`."""

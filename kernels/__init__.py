"""Triton kernels of selopt, installed as selopt.kernels."""

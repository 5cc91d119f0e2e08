"""Triton kernels of grpo_lab (``grpo_lab.kernels``).

The shared-prefix attention kernel and its PyTorch reference live here.
"""

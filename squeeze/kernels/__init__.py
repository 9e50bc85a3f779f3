"""Attention kernels: each operation beside its PyTorch reference."""

"""The cpu backend: reference kernels on host memory."""

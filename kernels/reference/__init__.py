"""kernels/reference."""

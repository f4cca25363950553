"""backends/rocm."""

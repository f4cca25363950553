"""backends/cuda."""

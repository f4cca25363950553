"""backends/cpu."""

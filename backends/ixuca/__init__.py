"""backends/ixuca."""

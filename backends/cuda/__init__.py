"""NVIDIA CUDA backend: probe.py (is it here?), devices.py (table), backend.py, plugin.py."""

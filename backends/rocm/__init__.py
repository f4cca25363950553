"""AMD ROCm backend (MI300X/MI325X/MI355X): probe.py, devices.py (table), backend.py, plugin.py."""

"""Iluvatar CoreX (IXUCA) backend, BI-V150: probe.py, devices.py (table), backend.py, plugin.py."""

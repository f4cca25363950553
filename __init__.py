"""ernie-hal: one engine for ERNIE-4.5 text models on CUDA, ROCm, Iluvatar CoreX and CPU."""

__version__ = "0.1.0"

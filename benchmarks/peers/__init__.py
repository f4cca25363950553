"""Peer engines the benchmarks run beside ernie-hal (llama.cpp); tooling only, not the package."""

"""SIMULATOR for the gpu-fleet lab, not NVIDIA software: simulated GPUs and NVIDIA apt repositories.

Lab-only: production code (operations/) never imports this package. See README.md here.
"""

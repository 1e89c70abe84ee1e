"""Lab stand-in for the production container registry (gpu-fleet lab): Debian's docker-registry
in a container on the lab network, fed from this machine's dockerd.

Lab-only: production code (operations/) never imports this package. See README.md here.
"""

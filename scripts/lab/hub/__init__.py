"""Lab stand-in for the Hugging Face Hub (gpu-fleet lab, not huggingface.co): tiny model, server.

Lab-only: production code (operations/) never imports this package. See README.md here.
"""

"""LAB STAND-IN for Docker's apt repository (download.docker.com): see README.md."""

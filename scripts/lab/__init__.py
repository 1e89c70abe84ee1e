"""The lab: stand-ins for what the development machines cannot reach (GPU servers, NVIDIA's
repositories, the model hub). Production code never imports this package."""

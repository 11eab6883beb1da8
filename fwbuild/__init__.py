"""fwbuild: build and serve what a Raspberry Pi 5 needs to boot as a distant VPN node."""

__version__ = "0.1.0"

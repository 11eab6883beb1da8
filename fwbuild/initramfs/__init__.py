"""Initramfs builder: apt packages, .deb staging, ELF and module closures, cpio newc."""

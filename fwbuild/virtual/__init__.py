"""The virtual Pi 5: emulated bootloader and the QEMU runner."""

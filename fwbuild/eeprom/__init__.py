"""The Pi 5 EEPROM: image model, bootconf rendering, pubkey.bin."""

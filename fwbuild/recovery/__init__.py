"""The SD-card EEPROM recovery kit: archive, disk image and card writer."""

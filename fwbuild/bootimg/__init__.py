"""The HTTP boot image: `boot.img` (a FAT volume without MBR) and `boot.sig`."""

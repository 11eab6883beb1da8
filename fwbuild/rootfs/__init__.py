"""Node root filesystems (the OS a distant node boots through the VPN)."""

"""The serving side of fwbuild: artifacts, enrollment, boot modes (imports fwbuild, never the reverse).

Entry points:
- `server.config.load_config(path) -> ServerConfig`
- `server.service.Service(config)`: the core (enrollment, node admin, artifacts, EEPROM rendering),
  shared by the HTTP handlers, the admin API and the `fwbuild nodes` CLI.
- `server.run.start_server(config) -> RunningServer` (in-process, `.stop()`), and
  `server.run.run_server(config)`: serves until SIGTERM/SIGINT (`fwbuild serve`).
"""

from __future__ import annotations

BOOT_MODES = ("enforced", "permissive")

"""authorized_keys lines for the `walt-vpn` user: the one place they are written.

Used by `fwbuild entrypoint ssh` (server.entrypoints) and by the real sshd of the tests
and the demo (fwbuild.virtual.sshd.TestSshd).

- `gate_line`: the fwbuild server's own sshd. A node certificate (`cert-authority`,
  principal `walt-vpn`) gets its Ethernet tunnel (sshd `PermitTunnel ethernet`) and every
  session goes to the forced command, the gate (server.gate), which reads the certificate's
  key id from $SSH_USER_AUTH (sshd `ExposeAuthInfo yes`). The options are spelled out
  instead of `restrict`: `restrict` means no-port-forwarding, no-agent-forwarding,
  no-X11-forwarding, no-pty, no-user-rc, and since OpenSSH 10.5 also no tunnel
  (serverloop.c server_request_tun checks `auth_opts->restricted`), which would close the
  node's first door. -L/-R/-D (and unix-socket forwards) are port forwarding.
- `forwarder_line`: a separate entrypoint host. It only relays the node's SSH connection
  to the server's sshd (`ssh -W`, what ProxyJump does): `restrict` (no tunnel, pty, agent,
  X11, user rc), port forwarding back on but `permitopen` only the server's sshd and
  `permitlisten` only a privileged port the unprivileged user cannot bind (authorized_keys
  has no "none" for it), and a forced command refusing any session. The node authenticates
  end to end with the server's sshd through that relay, so the gate there sees the node's
  certificate; no agent or key is ever handed to the entrypoint host.
"""

from __future__ import annotations

import shlex

from .errors import UsageError

VPN_USER = "walt-vpn"
GATE_OPTIONS = ("no-port-forwarding", "no-agent-forwarding", "no-X11-forwarding", "no-pty",
                "no-user-rc")
FORWARDER_REFUSAL = ("echo 'walt-vpn: this SSH entrypoint only relays to the fwbuild server "
                     "(ProxyJump)' >&2; exit 1")
UNBINDABLE_LISTEN = "localhost:1"  # privileged: the walt-vpn user cannot listen there


def _quoted_option(value: str, what: str) -> str:
    if any(c in value for c in '"\\\n\r\0'):
        raise UsageError(f"{what} cannot contain a double quote, backslash or newline",
                         value[:80], "use paths without those characters")
    return f'"{value}"'


def _ca(ca_public_key: str) -> str:
    fields = ca_public_key.split()
    if len(fields) < 2:
        raise UsageError("the SSH CA public key is not `<type> <base64>`", ca_public_key[:40])
    return " ".join(fields[:2])


def gate_line(ca_public_key: str, command: str, user: str = VPN_USER) -> str:
    """The server sshd's authorized_keys line: node certificates -> tunnel + the gate."""
    options = ",".join(("cert-authority", f'principals="{user}"', *GATE_OPTIONS,
                        f"command={_quoted_option(command, 'the gate command')}"))
    return f"{options} {_ca(ca_public_key)} fwbuild-ssh-ca\n"


def forwarder_line(ca_public_key: str, server_host: str, server_port: int,
                   user: str = VPN_USER) -> str:
    """A separate entrypoint host's line: relay to the server's sshd only, nothing else."""
    target = f"[{server_host}]:{server_port}" if ":" in server_host else f"{server_host}:{server_port}"
    options = ",".join(("cert-authority", f'principals="{user}"', "restrict", "port-forwarding",
                        f"permitopen={_quoted_option(target, 'the server address')}",
                        f'permitlisten="{UNBINDABLE_LISTEN}"',
                        f"command={_quoted_option(FORWARDER_REFUSAL, 'the refusal')}"))
    return f"{options} {_ca(ca_public_key)} fwbuild-ssh-ca\n"


def gate_command(python: str, admin_url: str, root_template: str, *,
                 pythonpath: str | None = None, sftp_log: str | None = None) -> str:
    """The forced command running server.gate (sshd runs it with the user's shell)."""
    words = [python, "-m", "server.gate", "--admin", admin_url, "--root", root_template]
    if sftp_log:
        words += ["--sftp-log", sftp_log]
    if pythonpath:  # a source tree rather than an installed package
        words = ["env", f"PYTHONPATH={pythonpath}", *words]
    return "exec " + " ".join(shlex.quote(w) for w in words)

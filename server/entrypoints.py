"""Entrypoint setup text: reverse-proxy configs (HTTP) and the SSH setup scripts (the
server's own sshd with the SSH gate; a separate entrypoint host relaying to it).

Pure functions: values in, text out (the CLI prints them).
"""

from __future__ import annotations

import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

from fwbuild.errors import UsageError
from fwbuild.sshgate import forwarder_line, gate_command, gate_line

from .certs import VPN_USER
from .config import Endpoint, HostKey
from .web import MAX_BODY

PROXIES = ("nginx", "haproxy", "apache")
DROPIN = "/etc/ssh/sshd_config.d/fwbuild-walt-vpn.conf"

_NOTE = (
    "the fwbuild server decides which requests may receive node secrets by their client\n"
    "address: keep this proxy's address OUT of the server's enrollment_subnets."
)


def _comment(text: str) -> str:
    return "".join(f"# {line}\n" for line in text.splitlines())


@dataclass(frozen=True)
class HttpCache:
    """The nginx entrypoint's boot image cache (entrypoints.http_cache_* in server.toml)."""

    directory: str = "/var/cache/nginx/fwbuild"
    max_size: str = "20g"


def _common(indent: str) -> str:
    return "".join(f"{indent}{line}\n" for line in (
        "proxy_http_version 1.1;",
        'proxy_set_header Connection "";',
        "proxy_set_header Host $host;",
        "# The server trusts X-Real-IP from this entrypoint's address only: always set it",
        "# here, so a node's own X-Real-IP header never reaches the server.",
        "proxy_set_header X-Real-IP $remote_addr;"))


def _nginx(servers: tuple[Endpoint, ...], listen_port: int | str, cache: HttpCache) -> str:
    upstream = "".join(f"    server {s.render(-1)};\n" for s in servers)
    return rf"""# Install as /etc/nginx/conf.d/fwbuild-walt-vpn.conf (nginx's http context; needs
# the auth_request module: nginx-light/-full/-extras on Debian). List this entrypoint's
# address in the server's [entrypoints] http_trusted.
upstream fwbuild_servers {{
{upstream}    keepalive 16;
}}
# Boot images by digest: the key is the content's sha256, so an entry never goes stale
# and the servers send each boot.img once per entrypoint (not once per boot).
proxy_cache_path {cache.directory} levels=1:2 keys_zone=fwbuild_boot:10m
                 max_size={cache.max_size} inactive=30d use_temp_path=off;

server {{
    listen {listen_port};

    location ^~ /walt-vpn/ {{
        # Per-node boot paths (the Pi 5 bootloader follows no redirect: answered here).
        # A sub-request asks the server whether the node may boot (revoked: 403) and
        # which content it gets; the body then comes from the cache, keyed by digest.
        location ~ ^/walt-vpn/(node|per-ip)/[^/]+/boot\.(img|sig)$ {{
            auth_request /_fwbuild_auth;
            auth_request_set $fwbuild_object $upstream_http_x_fwbuild_object;
            # any other answer of the sub-request than 2xx/401/403 (404: unknown node,
            # a server error): the servers answer the request themselves
            error_page 500 = @fwbuild_direct;
            proxy_pass http://fwbuild_servers/walt-vpn/by-digest/$fwbuild_object;
            proxy_buffering on;  # (caching needs it)
            proxy_cache fwbuild_boot;
            proxy_cache_key $fwbuild_object;
            proxy_cache_valid 200 30d;
            # one fetch per digest: concurrent misses wait for it (tens of MB)
            proxy_cache_lock on;
            proxy_cache_lock_timeout 600s;
            proxy_cache_lock_age 600s;
            # the per-node path is not immutable: it changes with the artifact set
            proxy_hide_header Cache-Control;
            add_header Cache-Control "no-cache" always;
            add_header X-Cache-Status $upstream_cache_status always;
            proxy_read_timeout 300s;
{_common("            ")}        }}

        # everything else under /walt-vpn/ goes to the servers unchanged, streamed
        # (Range and conditional requests pass through)
        proxy_pass http://fwbuild_servers/walt-vpn/;
        proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
        proxy_buffering off;
        proxy_request_buffering off;
        client_max_body_size {MAX_BODY // 1024}k;
        proxy_read_timeout 300s;
{_common("        ")}    }}

    location = /_fwbuild_auth {{
        internal;
        proxy_pass http://fwbuild_servers/walt-vpn/entrypoint-auth;
        proxy_pass_request_body off;
        proxy_set_header Content-Length "";
        proxy_set_header X-Original-URI $request_uri;
        proxy_set_header Range "";
        proxy_set_header If-None-Match "";
        proxy_set_header If-Modified-Since "";
{_common("        ")}    }}

    location @fwbuild_direct {{
        proxy_pass http://fwbuild_servers;
        proxy_buffering off;
{_common("        ")}    }}
}}
"""


def http_entrypoint_config(kind: str, server: Endpoint | tuple[Endpoint, ...],
                           listen_port: int | str = 80, cache: HttpCache | None = None) -> str:
    """Reverse-proxy config forwarding `/walt-vpn/` to the fwbuild server(s); nginx also
    answers the per-node boot paths from its cache (keyed by digest). `listen_port` may be
    `address:port` for nginx."""
    servers = server if isinstance(server, tuple) else (server,)
    target = servers[0].render(-1)  # always host:port
    header = _comment(f"fwbuild HTTP entrypoint ({kind}): forward /walt-vpn/ to "
                      f"{', '.join(s.render(-1) for s in servers)}.\n" + _NOTE)
    if kind == "nginx":
        return header + _nginx(servers, listen_port, cache or HttpCache())
    if kind == "haproxy":
        backends = "".join(f"    server fwbuild{i + 1} {s.render(-1)} check\n"
                           for i, s in enumerate(servers)) if len(servers) > 1 else \
            f"    server fwbuild {target}\n"
        return header + f"""# (no boot image cache here: `--nginx` prints the entrypoint that caches by digest)
frontend walt_vpn_http
    bind :{listen_port}
    mode http
    timeout client 300s
    acl is_walt_vpn path_beg /walt-vpn/
    http-request deny deny_status 413 if {{ req.body_size gt {MAX_BODY} }}
    use_backend fwbuild_server if is_walt_vpn

backend fwbuild_server
    mode http
    timeout connect 10s
    timeout server 300s
    option forwardfor
{backends}"""
    if kind == "apache":
        if len(servers) > 1:
            raise UsageError("the apache config forwards to one server", "--server",
                             "give one --server, or use --nginx or --haproxy for several")
        return header + f"""# Needs: a2enmod proxy proxy_http
<VirtualHost *:{listen_port}>
    ProxyRequests Off
    LimitRequestBody {MAX_BODY}
    <Location "/walt-vpn/">
        ProxyPass "http://{target}/walt-vpn/" timeout=300
        ProxyPassReverse "http://{target}/walt-vpn/"
    </Location>
</VirtualHost>
"""
    raise UsageError(f"unknown reverse proxy {kind!r}", "entrypoint http",
                     f"use one of: {', '.join('--' + p for p in PROXIES)}")


def _user_setup(user: str, authorized_keys: str) -> str:
    return f"""user={user}
if ! id "$user" >/dev/null 2>&1; then
    useradd --system --create-home --home-dir /var/lib/$user --shell /bin/sh "$user"
fi
home=$(getent passwd "$user" | cut -d: -f6)
mkdir -p "$home/.ssh"
cat > "$home/.ssh/authorized_keys.new" <<'EOF'
{authorized_keys.rstrip()}
EOF
mv "$home/.ssh/authorized_keys.new" "$home/.ssh/authorized_keys"
"""


def _plain_path(value: str, what: str) -> str:
    if not value.startswith("/") or any(c in value for c in "\n\r\"' \\$`"):
        raise UsageError(f"{what} {value!r} cannot go into the setup script",
                         what, "use an absolute path without spaces, quotes or $")
    return value


def server_sshd_script(ca_public_key: str, admin_url: str, node_root: str, revoked_keys: str,
                       *, python: str | None = None, pythonpath: str | None = None) -> str:
    """Shell script (run as root on the fwbuild server) setting up the gate on its sshd.

    authorized_keys of `walt-vpn`: node certificates get their tunnel and the gate
    (server.gate) as forced command; a `Match User walt-vpn` drop-in adds what sshd must
    do for that user only (ExposeAuthInfo, PermitTunnel ethernet, RevokedKeys, and no
    forwarding/pty/agent/X11 as a second lock).
    """
    python = python or sys.executable
    if pythonpath is None:  # where the `server` package lives (source tree or site-packages)
        pythonpath = str(Path(__file__).resolve().parent.parent)
    line = gate_line(ca_public_key, gate_command(python, admin_url, node_root,
                                                 pythonpath=pythonpath))
    revoked = _plain_path(revoked_keys, "revoked_keys_file")
    return f"""#!/bin/sh
# fwbuild SSH gate setup: run as root on the fwbuild server (its own sshd).
# Creates user {VPN_USER}; writes its ~/.ssh/authorized_keys (node certificates: tunnel +
# forced command `{python} -m server.gate`) and {DROPIN}
# (Match User {VPN_USER}: ExposeAuthInfo, PermitTunnel ethernet, RevokedKeys), checks the
# sshd configuration (sshd -t; restored when refused) and reloads sshd. Other users keep
# their settings. The gate asks the admin API at {admin_url} and serves
# node_root {node_root} read-only, each node its own.
# sshd opens the server end of a node's tunnel (ssh -w) in the user's session process:
# it needs CAP_NET_ADMIN there (README, "SSH entrypoint").
set -eu
{_user_setup(VPN_USER, line)}chmod 700 "$home/.ssh"
chmod 600 "$home/.ssh/authorized_keys"
chown -R "$user:" "$home/.ssh"
if ! grep -Eqi '^[[:space:]]*Include[[:space:]]+/etc/ssh/sshd_config.d/' /etc/ssh/sshd_config; then
    echo "/etc/ssh/sshd_config does not include /etc/ssh/sshd_config.d/*.conf:" >&2
    echo "add 'Include /etc/ssh/sshd_config.d/*.conf' at its top, then run this again" >&2
    exit 1
fi
conf={DROPIN}
[ ! -e "$conf" ] || cp -p "$conf" "$conf.fwbuild-old"
[ -e {revoked} ] || {{ mkdir -p "$(dirname {revoked})"; : > {revoked}; }}
cat > "$conf.new" <<'EOF'
# Written by `fwbuild entrypoint ssh`: the {VPN_USER} user's sshd settings.
Match User {VPN_USER}
    ExposeAuthInfo yes
    PermitTunnel ethernet
    RevokedKeys {revoked}
    AllowTcpForwarding no
    AllowAgentForwarding no
    X11Forwarding no
    PermitTTY no
    PermitUserRC no
EOF
mv "$conf.new" "$conf"
if ! sshd -t; then
    if [ -e "$conf.fwbuild-old" ]; then mv "$conf.fwbuild-old" "$conf"; else rm -f "$conf"; fi
    echo "sshd -t refused the configuration: $conf restored, sshd not reloaded" >&2
    exit 1
fi
rm -f "$conf.fwbuild-old"
systemctl reload ssh 2>/dev/null || systemctl reload sshd 2>/dev/null \\
    || kill -HUP "$(cat /run/sshd.pid)"
echo "SSH gate ready: user $user on this server's sshd"
"""


def ssh_entrypoint_script(ca_public_key: str, server_ssh: Endpoint,
                          server_host_keys: tuple[HostKey, ...] = ()) -> str:
    """Shell script (run as root on a separate SSH entrypoint host) creating `walt-vpn`.

    Only that user's authorized_keys and known_hosts are written; sshd_config is untouched.
    Nodes authenticate with their certificate and may only relay their SSH connection to
    the server's sshd (ProxyJump, `ssh -W`), where the certificate is checked a second
    time against RevokedKeys and the gate decides what the node may do (fwbuild.sshgate).
    """
    line = forwarder_line(ca_public_key, server_ssh.host, server_ssh.port)
    permit = f"{server_ssh.host}:{server_ssh.port}"
    target = server_ssh.render(22)
    known = "\n".join(
        f"{server_ssh.host if server_ssh.port == 22 else f'[{server_ssh.host}]:{server_ssh.port}'}"
        f" {key.line()}" for key in server_host_keys)
    keyscan = (f"cat > \"$home/.ssh/known_hosts\" <<'EOF'\n{known}\nEOF" if known else
               f"ssh-keyscan -p {server_ssh.port} {shlex.quote(server_ssh.host)} "
               f"> \"$home/.ssh/known_hosts\"")
    return f"""#!/bin/sh
# fwbuild SSH entrypoint setup: run as root on the SSH entrypoint host.
# Creates user {VPN_USER}; writes only its ~/.ssh/authorized_keys and ~/.ssh/known_hosts.
# No global sshd change. Nodes log in with their fwbuild certificate and may only relay
# their SSH connection to the fwbuild server's sshd ({target}; the nodes' ProxyJump,
# server.toml [entrypoints] proxy_jump), which checks the certificate again (RevokedKeys)
# and runs the SSH gate. No shell, tunnel, agent, pty or other forwarding on this host.
set -eu
{_user_setup(VPN_USER, line)}{keyscan}
chmod 700 "$home/.ssh"
chmod 600 "$home/.ssh/authorized_keys" "$home/.ssh/known_hosts"
chown -R "$user:" "$home/.ssh"
echo "SSH entrypoint ready: user $user, relaying to {permit}"
"""

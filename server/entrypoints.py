"""Entrypoint setup text: reverse-proxy configs (HTTP) and the SSH entrypoint script.

Pure functions: values in, text out (the CLI prints them).
"""

from __future__ import annotations

import shlex

from fwbuild.errors import UsageError

from .certs import VPN_USER
from .config import Endpoint, HostKey
from .http import MAX_BODY

PROXIES = ("nginx", "haproxy", "apache")

_NOTE = (
    "the fwbuild server decides which requests may receive node secrets by their client\n"
    "address: keep this proxy's address OUT of the server's enrollment_subnets."
)


def _comment(text: str) -> str:
    return "".join(f"# {line}\n" for line in text.splitlines())


def http_entrypoint_config(kind: str, server: Endpoint, listen_port: int = 80) -> str:
    """Reverse-proxy config forwarding `/walt-vpn/` to the fwbuild server."""
    target = server.render(-1)  # always host:port
    header = _comment(f"fwbuild HTTP entrypoint ({kind}): forward /walt-vpn/ to {target}.\n"
                      + _NOTE)
    if kind == "nginx":
        return header + f"""# Put this inside the `server {{ listen {listen_port}; ... }}` block of the site.
location ^~ /walt-vpn/ {{
    proxy_pass http://{target}/walt-vpn/;
    proxy_http_version 1.1;
    proxy_set_header Connection "";
    proxy_set_header Host $host;
    proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
    # boot.img is tens of MB: stream it (Range and conditional requests pass through).
    proxy_buffering off;
    proxy_request_buffering off;
    client_max_body_size {MAX_BODY // 1024}k;
    proxy_read_timeout 300s;
}}
"""
    if kind == "haproxy":
        return header + f"""frontend walt_vpn_http
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
    server fwbuild {target}
"""
    if kind == "apache":
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


def ssh_entrypoint_script(ca_public_key: str, server_ssh: Endpoint,
                          server_host_keys: tuple[HostKey, ...] = ()) -> str:
    """Shell script (run as root on the SSH entrypoint) creating the `walt-vpn` user.

    Only that user's authorized_keys and known_hosts are written; sshd_config is untouched.
    Nodes authenticate with their certificate (`cert-authority`, principal `walt-vpn`) and
    may only open a TCP forward to the server's sshd, where the certificate is checked a
    second time against RevokedKeys (so revocation needs no change here).
    """
    ca = " ".join(ca_public_key.split()[:2])
    permit = f"{server_ssh.host}:{server_ssh.port}"
    options = (f'cert-authority,principals="{VPN_USER}",restrict,port-forwarding,'
               f'permitopen="{permit}"')
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
# No global sshd change. Nodes log in with their fwbuild certificate and may only
# forward a TCP connection to the fwbuild server's sshd ({target}), which checks the
# certificate again (TrustedUserCAKeys + RevokedKeys): revocation takes effect there.
set -eu
user={VPN_USER}
if ! id "$user" >/dev/null 2>&1; then
    useradd --system --create-home --home-dir /var/lib/$user --shell /bin/sh "$user"
fi
home=$(getent passwd "$user" | cut -d: -f6)
mkdir -p "$home/.ssh"
cat > "$home/.ssh/authorized_keys" <<'EOF'
{options} {ca} fwbuild-ssh-ca
EOF
{keyscan}
chmod 700 "$home/.ssh"
chmod 600 "$home/.ssh/authorized_keys" "$home/.ssh/known_hosts"
chown -R "$user:" "$home/.ssh"
echo "SSH entrypoint ready: user $user, forwarding to {permit}"
"""

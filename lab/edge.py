"""The edge: an nginx that enforces a concurrent-connection limit on proxied WebSockets.

When the limit is reached, nginx rejects new upgrades with HTTP 502 while the origins
behind it still return 101, which is how Cloudflare's edge behaves at a zone's limit.
"""

from __future__ import annotations

import subprocess

from layout import BACKEND_PORT, EDGE_ADDRESS, EDGE_CONNECTION_LIMIT, EDGE_PORT, HOSTS, NGINX_DIR
from procs import (
    LabError,
    children_of,
    first_line,
    pid_from_file,
    pids_listening_on,
    read_cmdline,
    remove_file,
    stop_processes,
    wait_until,
)

NGINX = "/usr/sbin/nginx"
NGINX_CONFIG = NGINX_DIR / "nginx.conf"
NGINX_PID_FILE = NGINX_DIR / "nginx.pid"
NGINX_LOG_DIR = NGINX_DIR / "logs"
NGINX_ERROR_LOG = NGINX_LOG_DIR / "error.log"


def config_text() -> str:
    # max_fails=0 turns off passive health checks. With the default max_fails=1, one refused
    # connect during a backend restart marked the server failed, and nginx 1.22 then passed
    # about one request per fail_timeout to it while the upgraded WebSockets stayed open.
    # The edge returned 502 "no live upstreams" with connection slots free.
    upstream_servers = "\n".join(
        f"        server {host.address}:{BACKEND_PORT} max_fails=0;" for host in HOSTS
    )
    temp = NGINX_DIR / "temp"
    return f"""# Edge of the cfheal lab, written by scripts/lab up.
worker_processes 1;
pid {NGINX_PID_FILE};
error_log {NGINX_ERROR_LOG} info;

events {{
    worker_connections 1024;
}}

http {{
    access_log {NGINX_LOG_DIR}/access.log;
    client_body_temp_path {temp}/client_body;
    proxy_temp_path {temp}/proxy;
    fastcgi_temp_path {temp}/fastcgi;
    uwsgi_temp_path {temp}/uwsgi;
    scgi_temp_path {temp}/scgi;

    # One counter for the whole server, like a zone-wide limit. limit_conn ignores requests
    # whose key is empty, so server_name must be set.
    limit_conn_zone $server_name zone=edge:1m;

    upstream ws_backends {{
{upstream_servers}
    }}

    server {{
        listen {EDGE_ADDRESS}:{EDGE_PORT};
        server_name edge.cfheal-lab;

        limit_conn edge {EDGE_CONNECTION_LIMIT};
        limit_conn_status 502;

        location /ws/ {{
            proxy_pass http://ws_backends;
            proxy_http_version 1.1;
            proxy_set_header Upgrade $http_upgrade;
            proxy_set_header Connection "upgrade";
            proxy_set_header Host $host;
            proxy_set_header X-Forwarded-For $remote_addr;
            proxy_read_timeout 3600s;
            proxy_send_timeout 3600s;
        }}
    }}
}}
"""


def nginx_command(*extra: str) -> list[str]:
    return [
        NGINX, "-p", f"{NGINX_DIR}/", "-c", str(NGINX_CONFIG), "-e", str(NGINX_ERROR_LOG), *extra
    ]


def nginx_pid() -> int | None:
    return pid_from_file(NGINX_PID_FILE, str(NGINX_CONFIG))


def write_config() -> bool:
    """Write and test nginx.conf, and return whether its content changed."""
    NGINX_LOG_DIR.mkdir(parents=True, exist_ok=True)
    (NGINX_DIR / "temp").mkdir(parents=True, exist_ok=True)
    content = config_text()
    changed = not NGINX_CONFIG.exists() or NGINX_CONFIG.read_text() != content
    if changed:
        NGINX_CONFIG.write_text(content)
    check = subprocess.run(nginx_command("-t", "-q"), capture_output=True, text=True)
    if check.returncode != 0:
        raise LabError(f"nginx config {NGINX_CONFIG} is invalid: {first_line(check.stderr)}")
    return changed


def start_nginx() -> bool:
    """Start the edge unless it runs with the current config, and return whether it started.

    A changed config restarts nginx, because a reload would keep old workers with their
    WebSockets open for up to proxy_read_timeout.
    """
    changed = write_config()
    if nginx_pid() is not None:
        if not changed:
            return False
        stop_nginx()
    stop_orphaned_workers()
    result = subprocess.run(
        nginx_command(), capture_output=True, text=True, stdin=subprocess.DEVNULL
    )
    if result.returncode != 0:
        raise LabError(f"nginx failed to start: {first_line(result.stderr)}; see {NGINX_ERROR_LOG}")
    if not wait_until(lambda: nginx_pid() is not None, 5):
        raise LabError(f"nginx did not write {NGINX_PID_FILE} within 5 s; see {NGINX_ERROR_LOG}")
    return True


def stop_orphaned_workers() -> list[int]:
    """Stop nginx workers that outlived a killed master and still hold the edge's port.

    Their command line does not name the config, so they are found by the listening socket.
    """
    orphans = [
        pid for pid in pids_listening_on(EDGE_ADDRESS, EDGE_PORT)
        if read_cmdline(pid).startswith("nginx: worker process")
    ]
    if orphans:
        stop_processes(orphans, 5)
    return orphans


def stop_nginx() -> bool:
    """Stop nginx at once, closing every proxied connection, and return whether it was running."""
    pid = nginx_pid()
    if pid is None:
        return bool(stop_orphaned_workers())
    # SIGTERM is nginx's fast shutdown, while SIGQUIT would wait for every WebSocket to close.
    # The workers are listed too because their command lines do not name the config.
    stop_processes([pid, *children_of(pid)], 10)
    remove_file(NGINX_PID_FILE)
    return True

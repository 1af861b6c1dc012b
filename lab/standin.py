"""The lab's Cloudflare API stand-in (lab/cloudflare_api.py) as a detached process.

scripts/lab starts it on CLOUDFLARE_ADDRESS:CLOUDFLARE_PORT with its state in
CLOUDFLARE_STATE_DIR, and talks to it through its administration interface under
CLOUDFLARE_ADMIN_URL. cfheal reads the API token from CLOUDFLARE_TOKEN_FILE.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import urllib.error
import urllib.request
from typing import Any

from layout import (
    CLOUDFLARE_ADDRESS,
    CLOUDFLARE_ADMIN_URL,
    CLOUDFLARE_LOG,
    CLOUDFLARE_PID_FILE,
    CLOUDFLARE_PORT,
    CLOUDFLARE_STATE_DIR,
    CLOUDFLARE_TOKEN_FILE,
    LAB_CODE_DIR,
)
from procs import (
    LabError,
    first_line,
    pid_from_file,
    pids_listening_on,
    read_cmdline,
    remove_file,
    stop_processes,
    wait_until,
)

STANDIN_SCRIPT = LAB_CODE_DIR / "cloudflare_api.py"
# The state directory and address mark the process, not the script's path, because a stand-in
# started from another checkout of the repository serves the same lab and must be found too.
STANDIN_MARKER = f"--state-dir {CLOUDFLARE_STATE_DIR} --listen {CLOUDFLARE_ADDRESS}"
# File names that lab/cloudflare_api.py uses in its state directory (SCENARIO_FILE and
# REQUESTS_FILE there), repeated so that reading them does not import the stand-in.
SCENARIO_PATH = CLOUDFLARE_STATE_DIR / "scenario.json"
REQUESTS_PATH = CLOUDFLARE_STATE_DIR / "requests.jsonl"

STANDIN_START_TIMEOUT_S = 15
STANDIN_STOP_TIMEOUT_S = 5
ADMIN_TIMEOUT_S = 5
RESPONSE_CHECK_TIMEOUT_S = 2

# The stand-in listens on loopback only, so no proxy from the environment may carry the requests.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def standin_command() -> list[str]:
    return [
        sys.executable, str(STANDIN_SCRIPT),
        "--state-dir", str(CLOUDFLARE_STATE_DIR),
        "--listen", CLOUDFLARE_ADDRESS,
        "--port", str(CLOUDFLARE_PORT),
    ]


def standin_pid() -> int | None:
    return pid_from_file(CLOUDFLARE_PID_FILE, STANDIN_MARKER)


def call_admin(method: str, action: str, timeout_s: float = ADMIN_TIMEOUT_S) -> tuple[int, Any]:
    """Send one request to the stand-in's administration interface.

    Returns the HTTP status and the decoded JSON body, also for an error status. Raises
    LabError when no HTTP response arrives or the body is not JSON.
    """
    url = f"{CLOUDFLARE_ADMIN_URL}/{action}"
    request = urllib.request.Request(url, method=method)
    try:
        with _OPENER.open(request, timeout=timeout_s) as response:
            status, raw = response.status, response.read()
    except urllib.error.HTTPError as error:
        status, raw = error.code, error.read()
    except OSError as error:
        # URLError and TimeoutError are both OSErrors. URLError keeps the cause in reason.
        reason = getattr(error, "reason", error)
        raise LabError(f"{method} {url} failed: {reason}") from None
    try:
        return status, json.loads(raw) if raw else None
    except ValueError:
        raise LabError(
            f"{method} {url} returned HTTP {status} with a body that is not JSON"
        ) from None


def error_detail(body: Any) -> Any:
    """Return the message of an administration error body, which is {"error": MESSAGE}."""
    return body.get("error", body) if isinstance(body, dict) else body


def is_responding() -> bool:
    """Return whether the stand-in returns any HTTP response to GET scenario."""
    try:
        call_admin("GET", "scenario", RESPONSE_CHECK_TIMEOUT_S)
    except LabError:
        return False
    return True


def ensure_address_free() -> None:
    """Stop stand-ins of this lab that lost their pid file, then check that the port is free.

    Raises LabError naming the process when another program listens on the stand-in's port,
    on its address or on every address.
    """
    holders = set(pids_listening_on(CLOUDFLARE_ADDRESS, CLOUDFLARE_PORT))
    holders.update(pids_listening_on("0.0.0.0", CLOUDFLARE_PORT))
    orphans = [pid for pid in holders if STANDIN_MARKER in read_cmdline(pid)]
    if orphans:
        stop_processes(orphans, STANDIN_STOP_TIMEOUT_S)
    others = sorted(holders - set(orphans))
    if others:
        command = read_cmdline(others[0])[:100] or "command line unknown"
        raise LabError(
            f"cannot start the Cloudflare stand-in: port {CLOUDFLARE_PORT} on "
            f"{CLOUDFLARE_ADDRESS} is already in use by pid {others[0]} ({command}); stop that "
            f"process and run scripts/lab up again"
        )


def start_standin() -> bool:
    """Start the stand-in unless it runs and responds, and return whether it started.

    Waits until it responds. Raises LabError when its port is taken, or when it exits or does
    not respond within STANDIN_START_TIMEOUT_S.
    """
    if standin_pid() is not None:
        if is_responding():
            return False
        stop_standin()
    ensure_address_free()

    CLOUDFLARE_STATE_DIR.mkdir(parents=True, exist_ok=True)
    CLOUDFLARE_PID_FILE.parent.mkdir(parents=True, exist_ok=True)
    log_offset = CLOUDFLARE_LOG.stat().st_size if CLOUDFLARE_LOG.exists() else 0
    with open(CLOUDFLARE_LOG, "ab") as log_file:
        process = subprocess.Popen(
            standin_command(),
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=log_file,
            start_new_session=True,
            close_fds=True,
            cwd="/",
        )
    CLOUDFLARE_PID_FILE.write_text(f"{process.pid}\n")

    def responded() -> bool:
        if process.poll() is None:
            return is_responding()
        remove_file(CLOUDFLARE_PID_FILE)
        reason = last_log_line(log_offset)
        if str(SCENARIO_PATH) in reason:
            hint = "run scripts/lab reset to restore the default scenario"
        else:
            hint = f"see {CLOUDFLARE_LOG}"
        raise LabError(
            f"Cloudflare stand-in exited with code {process.returncode}: {reason}; {hint}"
        )

    if not wait_until(responded, STANDIN_START_TIMEOUT_S, 0.2):
        raise LabError(
            f"Cloudflare stand-in (pid {process.pid}) did not respond on {CLOUDFLARE_ADMIN_URL} "
            f"within {STANDIN_START_TIMEOUT_S} s; see {CLOUDFLARE_LOG}"
        )
    return True


def last_log_line(offset: int) -> str:
    """Return the last non-empty line that the log gained after offset."""
    try:
        with open(CLOUDFLARE_LOG, "rb") as log_file:
            log_file.seek(offset)
            text = log_file.read().decode(errors="replace")
    except OSError as error:
        return f"log not readable: {error.strerror}"
    return first_line("\n".join(reversed(text.splitlines())))


def stop_standin() -> bool:
    """Stop the stand-in and return False when it was not running."""
    pid = standin_pid()
    if pid is None:
        remove_file(CLOUDFLARE_PID_FILE)
        return False
    # SIGTERM makes the stand-in close its connections and end any injected delay at once.
    stop_processes([pid], STANDIN_STOP_TIMEOUT_S)
    remove_file(CLOUDFLARE_PID_FILE)
    return True


def default_token() -> str:
    """Return the value of the first active API token in the stand-in's default scenario."""
    # Imported here because the stand-in's module loads openapi-core, which makes every
    # scripts/lab command that does not need the token noticeably slower.
    from cloudflare_api import default_scenario

    for token in default_scenario()["tokens"]:
        if token["status"] == "active":
            return token["value"]
    raise LabError(f"the default scenario in {STANDIN_SCRIPT} has no active API token")


def ensure_token_file() -> bool:
    """Write the default scenario's API token to CLOUDFLARE_TOKEN_FILE with mode 0600.

    Returns whether the file changed. An unchanged file with mode 0600 is left alone.
    """
    content = default_token() + "\n"
    try:
        unchanged = (
            CLOUDFLARE_TOKEN_FILE.read_text() == content
            and stat.S_IMODE(CLOUDFLARE_TOKEN_FILE.stat().st_mode) == 0o600
        )
    except FileNotFoundError:
        unchanged = False
    if unchanged:
        return False

    CLOUDFLARE_STATE_DIR.mkdir(parents=True, exist_ok=True)
    temporary = CLOUDFLARE_TOKEN_FILE.with_name(f".{CLOUDFLARE_TOKEN_FILE.name}.tmp")
    remove_file(temporary)
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w") as stream:
        stream.write(content)
    os.replace(temporary, CLOUDFLARE_TOKEN_FILE)
    return True


def zone_plans(scenario: dict[str, Any]) -> list[dict[str, Any]]:
    """Return each zone of a scenario with the name and legacy id of its current plan."""
    plans = {plan.get("id"): plan for plan in scenario.get("plans", [])}
    zones = []
    for zone in scenario.get("zones", []):
        plan = plans.get(zone.get("plan_id"), {})
        zones.append({
            "id": zone.get("id"),
            "name": zone.get("name"),
            "plan_id": zone.get("plan_id"),
            "plan": plan.get("name", "unknown plan"),
            "legacy_id": plan.get("legacy_id"),
        })
    return zones


def describe_scenario(scenario: dict[str, Any]) -> str:
    plans = [f"{zone['name']} on {zone['plan']}" for zone in zone_plans(scenario)]
    return f"{', '.join(plans) or 'no zones'}, faults: {len(scenario.get('faults', []))}"


def reset_standin() -> str:
    """Restore the stand-in's default scenario, clear its request record, and describe the change.

    A running stand-in is reset through its administration interface. Otherwise the files in
    its state directory are reset, which also replaces a scenario file that it could not
    start with. Raises LabError when a running stand-in rejects the reset.
    """
    if standin_pid() is None or not is_responding():
        return reset_state_files()
    status, scenario = call_admin("GET", "scenario")
    if status == 200:
        before = describe_scenario(scenario)
    else:
        before = f"an invalid scenario: {error_detail(scenario)}"
    status, records = call_admin("GET", "requests")
    cleared = len(records) if status == 200 else "unknown number of"

    status, scenario = call_admin("POST", "reset")
    if status != 200:
        raise LabError(
            f"POST {CLOUDFLARE_ADMIN_URL}/reset returned HTTP {status}: {error_detail(scenario)}"
        )
    return (
        f"cloudflare: restored the default scenario ({describe_scenario(scenario)}) "
        f"in place of ({before}), cleared {cleared} recorded requests"
    )


def reset_state_files() -> str:
    """Write the default scenario and an empty request record with the stand-in's own code."""
    from cloudflare_api import ScenarioStore, default_scenario

    try:
        before = read_scenario_file()
        description = describe_scenario(before) if before is not None else "no scenario"
    except LabError:
        description = "an invalid scenario"
    cleared = len(read_requests_file())
    store = ScenarioStore(CLOUDFLARE_STATE_DIR)
    store.write(default_scenario())
    store.clear_requests()
    return (
        f"cloudflare: restored the default scenario ({describe_scenario(store.read())}) "
        f"in place of ({description}) in {CLOUDFLARE_STATE_DIR}, cleared {cleared} recorded "
        f"requests"
    )


def read_scenario_file() -> dict[str, Any] | None:
    """Return the scenario the stand-in left in its state directory, or None if there is none."""
    try:
        return json.loads(SCENARIO_PATH.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as error:
        raise LabError(f"cannot read {SCENARIO_PATH}: {error}") from None


def read_requests_file() -> list[dict[str, Any]]:
    """Return the requests recorded in the state directory, skipping lines that are not JSON.

    A line being appended while this reads is incomplete, so it is skipped, not an error.
    """
    try:
        lines = REQUESTS_PATH.read_text().splitlines()
    except FileNotFoundError:
        return []
    except OSError as error:
        raise LabError(f"cannot read {REQUESTS_PATH}: {error.strerror}") from None
    records = []
    for line in lines:
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    return records

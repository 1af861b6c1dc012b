"""Profile one cfheal rollout with pyinstrument, through cfheal's Python API.

Usage: profile_rollout.py CONFIG OUTPUT_PREFIX

pyinstrument samples only the thread that started it, and execute_rollout runs each batch
on a thread pool. With batches of one container the pool has one worker. This script
therefore runs the batches on the calling thread, which does the same work. It restarts
every container in the configuration, as ``cfheal run`` would, without detect, verify or
confirm, and writes OUTPUT_PREFIX.txt (the call tree), OUTPUT_PREFIX.html and
OUTPUT_PREFIX.log (cfheal's log events).
"""

from __future__ import annotations

import sys
from contextlib import ExitStack
from pathlib import Path

from pyinstrument import Profiler

import cfheal.rollout
from cfheal._logging import configure_logging
from cfheal.config import load_config
from cfheal.containers import Engine
from cfheal.hosts import HostTarget, SSHSession
from cfheal.policy import RestartTarget, load_playbook


def map_on_this_thread(function, items, *, max_workers: int, name: str) -> list:
    return [function(item) for item in items]


def main() -> int:
    config_path, output = Path(sys.argv[1]), Path(sys.argv[2])
    log_file = open(output.with_suffix(".log"), "w")
    configure_logging("json", stream=log_file)
    config = load_config(config_path)
    step = load_playbook(config.playbook).rollout
    targets = [RestartTarget(host.name, container.name, container.origin) for host in config.hosts for container in host.containers]
    batches = [targets[start : start + step.max_unavailable] for start in range(0, len(targets), step.max_unavailable)]
    if step.max_unavailable != 1:
        raise SystemExit("profile_rollout.py needs max_unavailable: 1, so each batch has one container")
    cfheal.rollout.map_in_threads = map_on_this_thread

    profiler = Profiler(interval=0.0005)
    with ExitStack() as stack:
        profiler.start()
        # The same steps as Controller._act: one SSH session and one Engine per host.
        engines = {}
        for host in config.hosts:
            session = stack.enter_context(SSHSession(HostTarget.from_config(config, host)))
            engine = Engine(session, timeout=session.target.command_timeout + step.stop_grace_period)
            stack.callback(engine.close)
            engines[host.name] = engine
        result = cfheal.rollout.execute_rollout(batches, step, engines, origin_timeout=config.origins.connect_timeout)
        profiler.stop()

    output.with_suffix(".txt").write_text(profiler.output_text(unicode=True, color=False, show_all=False))
    output.with_suffix(".html").write_text(profiler.output_html())
    print(f"{result.outcome} in {result.duration_ms} ms: {result.reason}")
    return 0 if result.outcome == "completed" else 1


if __name__ == "__main__":
    sys.exit(main())

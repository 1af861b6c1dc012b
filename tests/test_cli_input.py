"""Bad input gets a message naming the file and key, a non-zero exit, and no traceback."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]


def restart_only_playbook() -> dict:
    """Return the committed playbook without its plan_upgrade step, which needs Cloudflare settings."""
    playbook = yaml.safe_load((REPO / "playbooks" / "restart-backends.yaml").read_text())
    playbook["steps"] = [step for step in playbook["steps"] if step["action"] == "rolling_restart"]
    return playbook


def cfheal(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cfheal", *args], capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)


@pytest.fixture
def config_dir(tmp_path: Path) -> Path:
    (tmp_path / "known_hosts").write_text("")
    (tmp_path / "id_ed25519").write_text("not a key")
    (tmp_path / "playbook.yaml").write_text(yaml.safe_dump(restart_only_playbook()))
    return tmp_path


def write_config(directory: Path, **overrides) -> Path:
    config = {
        "playbook": "playbook.yaml",
        "state_dir": "state",
        "edge": {"url": "ws://127.0.0.1:9/ws/"},
        "ssh": {"known_hosts": "known_hosts", "key_file": "id_ed25519"},
        "hosts": [{"name": "h1", "address": "127.0.0.1", "port": 9, "containers": [{"name": "app", "origin": "ws://127.0.0.1:9/"}]}],
    }
    config.update(overrides)
    path = directory / "cfheal.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def assert_clean_failure(result: subprocess.CompletedProcess, *fragments: str) -> None:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in result.stderr


class TestValidate:
    def test_valid_config_passes(self, config_dir):
        result = cfheal("validate", "-c", str(write_config(config_dir)))

        assert result.returncode == 0, result.stderr
        assert "valid" in result.stdout

    def test_invalid_yaml_names_line(self, config_dir):
        path = config_dir / "broken.yaml"
        path.write_text("edge: [unclosed\n")

        result = cfheal("validate", "-c", str(path))

        assert_clean_failure(result, "broken.yaml", "invalid YAML", "line 2")

    def test_unknown_key_named_with_its_path(self, config_dir):
        path = write_config(config_dir, edge={"url": "ws://127.0.0.1:9/", "probez": 3})

        result = cfheal("validate", "-c", str(path))

        assert_clean_failure(result, "edge.probez", "unknown key")

    def test_wrong_type_names_key_and_value(self, config_dir):
        hosts = [{"name": "h1", "address": "127.0.0.1", "port": "twenty-two", "containers": [{"name": "a", "origin": "ws://x/"}]}]

        result = cfheal("validate", "-c", str(write_config(config_dir, hosts=hosts)))

        assert_clean_failure(result, "hosts[0].port", "twenty-two")

    def test_bad_duration_says_what_is_expected(self, config_dir):
        result = cfheal("validate", "-c", str(write_config(config_dir, edge={"url": "ws://h/", "connect_timeout": "soon"})))

        assert_clean_failure(result, "edge.connect_timeout", "10s")

    def test_quorum_above_probes_rejected(self, config_dir):
        result = cfheal("validate", "-c", str(write_config(config_dir, edge={"url": "ws://h/", "probes": 2, "quorum": 3})))

        assert_clean_failure(result, "quorum (3) cannot exceed probes (2)")

    def test_missing_key_file_named(self, config_dir):
        path = write_config(config_dir, ssh={"known_hosts": "known_hosts", "key_file": "missing_key"})

        result = cfheal("validate", "-c", str(path))

        assert_clean_failure(result, "ssh.key_file", "missing_key", "not found")

    def test_unknown_playbook_action_named(self, config_dir):
        playbook = restart_only_playbook()
        playbook["steps"][0]["action"] = "reboot_everything"
        (config_dir / "playbook.yaml").write_text(yaml.safe_dump(playbook))

        result = cfheal("validate", "-c", str(write_config(config_dir)))

        assert_clean_failure(result, "playbook.yaml", "steps[0]", "reboot_everything", "rolling_restart", "plan_upgrade")

    def test_invalid_error_pattern_named(self, config_dir):
        playbook = restart_only_playbook()
        playbook["verify"]["logs"]["error_patterns"] = ["(unclosed"]
        (config_dir / "playbook.yaml").write_text(yaml.safe_dump(playbook))

        result = cfheal("validate", "-c", str(write_config(config_dir)))

        assert_clean_failure(result, "verify.logs.error_patterns", "(unclosed")

    def test_plan_upgrade_without_cloudflare_rejected(self, config_dir):
        playbook = restart_only_playbook()
        playbook["steps"].append({"action": "plan_upgrade"})
        (config_dir / "playbook.yaml").write_text(yaml.safe_dump(playbook))

        result = cfheal("validate", "-c", str(write_config(config_dir)))

        assert_clean_failure(result, "plan_upgrade", "cloudflare")

    def test_upgrade_before_restart_rejected(self, config_dir):
        playbook = restart_only_playbook()
        playbook["steps"].insert(0, {"action": "plan_upgrade"})
        (config_dir / "playbook.yaml").write_text(yaml.safe_dump(playbook))

        result = cfheal("validate", "-c", str(write_config(config_dir, cloudflare={"zone_id": "z"})))

        assert_clean_failure(result, "rolling_restart must come before plan_upgrade")

    def test_missing_config_file(self, tmp_path):
        result = cfheal("validate", "-c", str(tmp_path / "nope.yaml"))

        assert_clean_failure(result, "nope.yaml", "not found")


def test_run_without_terminal_or_yes_refuses(config_dir):
    result = cfheal("run", "-c", str(write_config(config_dir)))

    assert_clean_failure(result, "--yes")


class TestStateCommands:
    def test_history_empty(self, config_dir):
        result = cfheal("history", "-c", str(write_config(config_dir)))

        assert result.returncode == 0
        assert "no runs recorded yet" in result.stdout

    def test_show_unknown_run_says_how_to_list(self, config_dir):
        result = cfheal("show", "nope", "-c", str(write_config(config_dir)))

        assert result.returncode == 1
        assert "no run 'nope'" in result.stderr
        assert "cfheal history" in result.stderr

    def test_pause_then_resume(self, config_dir):
        config = str(write_config(config_dir))

        paused = cfheal("pause", "-c", config, "--reason", "maintenance")
        resumed = cfheal("resume", "-c", config)
        again = cfheal("resume", "-c", config)

        assert paused.returncode == 0
        assert "will not act" in paused.stdout
        assert "pause cleared" in resumed.stdout
        assert "nothing to resume" in again.stdout

    def test_trigger_without_watch_names_address(self, config_dir):
        config = write_config(config_dir, watch={"listen": "127.0.0.1:9"})

        result = cfheal("trigger", "-c", str(config))

        assert result.returncode == 1
        assert "no cfheal watch answers on 127.0.0.1:9" in result.stderr

    def test_approve_unknown_request(self, config_dir):
        result = cfheal("approve", "upg-missing", "-c", str(write_config(config_dir)), "--yes")

        assert result.returncode == 1
        assert "no request 'upg-missing'" in result.stderr
        assert "Traceback" not in result.stderr

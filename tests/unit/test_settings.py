"""Settings: CLI > environment > file > defaults, APISIX's variables, one-line validation errors."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from runner.settings import Settings, SettingsError, load_settings, parse_listen_address

ENV = {"APISIX_LISTEN_ADDRESS": "unix:/tmp/apisix-1.sock", "APISIX_CONF_EXPIRE_TIME": "3600"}


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "runner.yaml"
    path.write_text(text, encoding="utf-8")
    return str(path)


def error_of(**kwargs: Any) -> str:
    with pytest.raises(SettingsError) as caught:
        load_settings(**kwargs)
    message = str(caught.value)
    assert "\n" not in message, message
    assert message.strip() == message
    assert message
    return message


class TestApisixEnvironment:
    def test_defaults_from_apisix_environment(self) -> None:
        """With only APISIX's two variables the runner has everything it needs."""
        settings = load_settings(environ=ENV)

        assert settings.listen == "/tmp/apisix-1.sock"
        assert settings.conf_expire_time == 3600
        assert settings.token_ttl == pytest.approx(4320.0)
        assert settings.socket_mode == 0o766

    def test_listen_address_unix_prefix_is_stripped(self) -> None:
        """APISIX_LISTEN_ADDRESS has the form unix:<path>."""
        assert parse_listen_address("unix:/run/apisix/runner.sock") == "/run/apisix/runner.sock"

    def test_bare_path_is_accepted(self) -> None:
        """A bare absolute path (e.g. --listen) needs no prefix."""
        assert parse_listen_address("/run/x.sock") == "/run/x.sock"

    def test_relative_path_is_made_absolute(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        """A relative socket path is resolved against the working directory at start-up."""
        monkeypatch.chdir(tmp_path)
        (tmp_path / "conf").mkdir()
        settings = load_settings(environ={"APISIX_LISTEN_ADDRESS": "unix:conf/x.sock"})

        assert settings.listen == str(tmp_path / "conf" / "x.sock")
        assert os.path.isabs(settings.listen)

    def test_missing_socket_directory(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        """A socket directory that does not exist is a settings error, reported before binding."""
        monkeypatch.chdir(tmp_path)
        message = error_of(environ={"APISIX_LISTEN_ADDRESS": "unix:nowhere/x.sock"})

        assert f"socket directory {tmp_path / 'nowhere'} does not exist" in message

    @pytest.mark.parametrize("value", ["tcp:127.0.0.1:9999", "unix:", ""])
    def test_unusable_listen_address(self, value: str) -> None:
        """Only unix:<path> is supported; anything else is one clear error."""
        message = error_of(environ={"APISIX_LISTEN_ADDRESS": value})

        assert "listen address" in message

    def test_missing_listen_address(self) -> None:
        """Without APISIX_LISTEN_ADDRESS or --listen there is nothing to serve."""
        message = error_of(environ={})

        assert "APISIX_LISTEN_ADDRESS" in message

    def test_too_long_socket_path(self) -> None:
        """AF_UNIX paths are limited to 107 bytes; say so instead of failing at bind()."""
        message = error_of(environ={"APISIX_LISTEN_ADDRESS": "unix:/" + "x" * 120})

        assert "too long" in message

    @pytest.mark.parametrize("value", ["abc", "-5", "1.5", "", "0", "²"])
    def test_bad_conf_expire_time(self, value: str) -> None:
        """APISIX_CONF_EXPIRE_TIME must be a positive integer; anything else is one line."""
        message = error_of(environ={**ENV, "APISIX_CONF_EXPIRE_TIME": value})

        assert "APISIX_CONF_EXPIRE_TIME" in message


class TestTokenTtl:
    def test_defaults_to_1_2_times_expire_time(self) -> None:
        """The token TTL outlives APISIX's token cache by 20 %, as the Go runner does."""
        settings = load_settings(environ={**ENV, "APISIX_CONF_EXPIRE_TIME": "100"})

        assert settings.token_ttl == pytest.approx(120.0)

    @pytest.mark.parametrize("expire", [1, 3, 7, 3600])
    def test_default_passes_its_own_check(self, expire: int) -> None:
        """Float rounding in 1.2 x N never makes the default fail validation."""
        settings = load_settings(environ={**ENV, "APISIX_CONF_EXPIRE_TIME": str(expire)})

        assert settings.token_ttl >= expire

    def test_longer_ttl_is_accepted(self) -> None:
        """Keeping tokens longer than required is allowed."""
        settings = load_settings(environ=ENV, overrides={"token_ttl": 10_000})

        assert settings.token_ttl == 10_000

    def test_shorter_ttl_is_refused(self) -> None:
        """A TTL below 1.2 x APISIX_CONF_EXPIRE_TIME would forget tokens APISIX still uses."""
        message = error_of(environ=ENV, overrides={"token_ttl": 3600})

        assert "token_ttl" in message
        assert "1.2" in message

    def test_direct_construction_validates_too(self) -> None:
        """Settings built in code get the same checks as loaded ones."""
        with pytest.raises(SettingsError, match="token_ttl"):
            Settings(listen="/tmp/x.sock", conf_expire_time=10, token_ttl=11)


class TestPrecedence:
    def test_cli_over_env_over_file(self, tmp_path: Path) -> None:
        """CLI options beat the environment, which beats the file, which beats defaults."""
        path = write(tmp_path, "listen: /tmp/from-file.sock\ncall_timeout: 3\nlog_level: info\ndrain_timeout: 0.3\n")
        settings = load_settings(
            environ={"APISIX_LISTEN_ADDRESS": "unix:/tmp/from-env.sock"},
            config_file=path,
            overrides={"call_timeout": 5.0, "log_level": None},
        )

        assert settings.listen == "/tmp/from-env.sock"
        assert settings.call_timeout == 5.0
        assert settings.log_level == "info"
        assert settings.drain_timeout == 0.3
        assert settings.idle_timeout == 600.0

    def test_cli_listen_beats_environment(self) -> None:
        """--listen overrides APISIX_LISTEN_ADDRESS."""
        settings = load_settings(environ=ENV, overrides={"listen": "unix:/tmp/cli.sock"})

        assert settings.listen == "/tmp/cli.sock"

    def test_env_expire_time_beats_file(self, tmp_path: Path) -> None:
        """APISIX's expire time wins over a file value (APISIX is the one caching tokens)."""
        path = write(tmp_path, "conf_expire_time: 10\n")
        settings = load_settings(environ=ENV, config_file=path)

        assert settings.conf_expire_time == 3600
        assert settings.token_ttl == pytest.approx(4320.0)

    def test_file_values_are_typed(self, tmp_path: Path) -> None:
        """File values are coerced: octal socket mode strings, ints, plugin sections."""
        path = write(
            tmp_path,
            "socket_mode: '0760'\nmax_conf_entries: 10\nplugins:\n  mtls-guard:\n    policy_dir: /etc/p\n",
        )
        settings = load_settings(environ=ENV, config_file=path)

        assert settings.socket_mode == 0o760
        assert settings.max_conf_entries == 10
        assert settings.plugins == {"mtls-guard": {"policy_dir": "/etc/p"}}

    def test_empty_file_means_defaults(self, tmp_path: Path) -> None:
        """An empty YAML file is valid and changes nothing."""
        settings = load_settings(environ=ENV, config_file=write(tmp_path, ""))

        assert settings.call_timeout == 10.0


class TestValidationErrors:
    def test_bad_yaml_reports_line_and_column(self, tmp_path: Path) -> None:
        """A YAML syntax error names the file, line and column."""
        path = write(tmp_path, "call_timeout: 3\nlog_level: [info\n")
        message = error_of(environ=ENV, config_file=path)

        assert path in message
        assert "line 3" in message or "line 2" in message
        assert "column" in message

    def test_bad_yaml_exact_position(self, tmp_path: Path) -> None:
        """The position points at the offending character (1-based)."""
        path = write(tmp_path, "a: 1\nb: : :\n")
        message = error_of(environ=ENV, config_file=path)

        assert "line 2 column 4" in message

    def test_unknown_keys(self, tmp_path: Path) -> None:
        """Typos in the file are errors, not silently ignored settings."""
        path = write(tmp_path, "call_timout: 3\nlisten_addr: /x\n")
        message = error_of(environ=ENV, config_file=path)

        assert "unknown key(s) call_timout, listen_addr" in message

    def test_missing_file(self, tmp_path: Path) -> None:
        """A config file that does not exist is reported with its path."""
        message = error_of(environ=ENV, config_file=str(tmp_path / "nope.yaml"))

        assert "nope.yaml" in message

    def test_top_level_must_be_mapping(self, tmp_path: Path) -> None:
        """A list at the top level is refused."""
        message = error_of(environ=ENV, config_file=write(tmp_path, "- a\n- b\n"))

        assert "mapping" in message

    @pytest.mark.parametrize(
        ("text", "fragment"),
        [
            ("call_timeout: 100\n", "call_timeout"),
            ("call_timeout: 0\n", "call_timeout"),
            ("call_timeout: abc\n", "call_timeout must be a number"),
            ("call_timeout: .nan\n", "finite"),
            ("call_timeout: true\n", "call_timeout must be a number"),
            ("max_conf_entries: 1.5\n", "integer"),
            ("max_conf_entries: 0\n", "max_conf_entries"),
            ("drain_timeout: 2\n", "drain_timeout"),
            ("idle_timeout: 60\n", "idle_timeout"),
            ("socket_mode: '999'\n", "octal"),
            ("socket_mode: 0o1777\n", "socket_mode"),
            ("max_frame_bytes: 100\n", "max_frame_bytes"),
            ("log_level: WARN\n", "log_level"),
            ("event_loop: trio\n", "event_loop"),
            ("log_level: 5\n", "log_level must be a string"),
            ("log_file: [a]\n", "log_file"),
            ("plugins: [a]\n", "plugins"),
            ("plugins: {mtls-guard: 3}\n", "plugins.mtls-guard"),
        ],
    )
    def test_each_error_is_one_clear_line(self, tmp_path: Path, text: str, fragment: str) -> None:
        """Every invalid value produces a single-line SettingsError naming the setting."""
        message = error_of(environ=ENV, config_file=write(tmp_path, text))

        assert fragment in message

    def test_listen_in_file_must_be_a_string(self, tmp_path: Path) -> None:
        """A non-string listen value in the file is refused with one line."""
        message = error_of(environ={}, config_file=write(tmp_path, "listen: 5\n"))

        assert "listen must be a string" in message

    def test_cli_call_timeout_out_of_range(self) -> None:
        """--call-timeout 100 exceeds APISIX's 60 s read timeout minus margin."""
        message = error_of(environ=ENV, overrides={"call_timeout": 100.0})

        assert "call_timeout must be in (0, 56)" in message


class TestRelativePaths:
    """Relative paths in the config file are relative to the file, not to the working directory."""

    def elsewhere(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
        config_dir = tmp_path / "etc" / "mtls-guard"
        config_dir.mkdir(parents=True)
        cwd = tmp_path / "somewhere-else"
        cwd.mkdir()
        monkeypatch.chdir(cwd)
        return config_dir

    def test_plugin_file_option_resolves_against_the_config_directory(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """policy_file: policies.yaml names the file next to the config, whatever the working directory."""
        config_dir = self.elsewhere(tmp_path, monkeypatch)
        config = config_dir / "runner.yaml"
        config.write_text("plugins:\n  mtls-guard:\n    policy_file: policies.yaml\n    cert_cache_size: 10\n")

        settings = load_settings(environ=ENV, config_file=str(config))

        expected = {"policy_file": str(config_dir / "policies.yaml"), "cert_cache_size": 10}
        assert settings.plugins["mtls-guard"] == expected

    def test_relative_config_path_still_resolves_against_its_directory(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """--config given relative to the working directory: the option is relative to the file's directory."""
        config_dir = self.elsewhere(tmp_path, monkeypatch)
        (config_dir / "runner.yaml").write_text("plugins:\n  p:\n    policy_file: sub/p.yaml\n")

        settings = load_settings(environ=ENV, config_file="../etc/mtls-guard/runner.yaml")

        assert settings.plugins["p"]["policy_file"] == str(config_dir / "sub" / "p.yaml")

    def test_which_options_are_paths(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        """*_file/*_dir values and *_files/*_dirs list items resolve; absolute paths and other keys do not."""
        config_dir = self.elsewhere(tmp_path, monkeypatch)
        config = config_dir / "runner.yaml"
        config.write_text(
            "plugins:\n  p:\n"
            "    ca_file: ca.pem\n    cache_dir: cache\n    extra_files: [a.yaml, /abs/b.yaml]\n"
            "    include_dirs: [d]\n    log_file_mode: '0600'\n    name: file.txt\n    data_file: /abs/data\n"
            "    other_file: 5\n    empty_file: ''\n"
        )

        options = load_settings(environ=ENV, config_file=str(config)).plugins["p"]

        assert options["ca_file"] == str(config_dir / "ca.pem")
        assert options["cache_dir"] == str(config_dir / "cache")
        assert options["extra_files"] == [str(config_dir / "a.yaml"), "/abs/b.yaml"]
        assert options["include_dirs"] == [str(config_dir / "d")]
        assert options["log_file_mode"] == "0600"
        assert options["name"] == "file.txt"
        assert options["data_file"] == "/abs/data"
        assert options["other_file"] == 5  # left for the plugin's own validation
        assert options["empty_file"] == ""

    def test_runner_paths_in_the_file_resolve_too(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        """log_file and listen written in the file follow the same rule; the CLI's --log-file stays as given."""
        config_dir = self.elsewhere(tmp_path, monkeypatch)
        config = config_dir / "runner.yaml"
        config.write_text("listen: unix:r.sock\nlog_file: runner.log\n")

        from_file = load_settings(environ={}, config_file=str(config))
        from_cli = load_settings(environ={}, config_file=str(config), overrides={"log_file": "cli.log"})

        assert from_file.listen == str(config_dir / "r.sock")
        assert from_file.log_file == str(config_dir / "runner.log")
        assert from_cli.log_file == "cli.log"

    def test_tcp_listen_in_the_file_is_still_refused(self, tmp_path: Path) -> None:
        """Resolving paths never turns an unsupported listen address into a path."""
        message = error_of(environ={}, config_file=write(tmp_path, "listen: tcp:127.0.0.1:9999\n"))

        assert "only unix:<path> is supported" in message


class TestReplace:
    def test_apisix_listen_address_implies_replace(self) -> None:
        """The socket APISIX hands over may still be served by the runner of the previous reload."""
        assert load_settings(environ=ENV).replace is True

    def test_listen_option_does_not(self) -> None:
        """--listen (an operator's start) refuses a live socket unless --replace is given."""
        assert load_settings(environ=ENV, overrides={"listen": "/tmp/x.sock"}).replace is False
        assert load_settings(environ={}, overrides={"listen": "/tmp/x.sock", "replace": True}).replace is True

    def test_replace_is_not_a_file_key(self, tmp_path: Path) -> None:
        """Taking over a live runner is decided per start, never by a config file."""
        message = error_of(environ=ENV, config_file=write(tmp_path, "replace: true\n"))

        assert "unknown key(s) replace" in message

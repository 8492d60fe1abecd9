"""reload_watch_seconds: which paths are watched and what counts as a change."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from runner.settings import Settings
from runner.watch import fingerprint, watch_files, watched_paths


def _settings(sock_path: str, seconds: float, **plugins: dict[str, object]) -> Settings:
    return Settings(listen=sock_path, workers=1, reload_watch_seconds=seconds, plugins=plugins)


class TestPaths:
    def test_config_file_and_path_options_are_watched(self, tmp_path: Path, sock_path: str) -> None:
        """The config file, then every *_file(s)/*_dir(s) option of every plugin; other options are not paths."""
        settings = _settings(
            sock_path,
            1,
            a={"policy_file": "/p.yaml", "crl_files": ["/c1", "/c2"], "ca_dir": "/cas", "size": 5, "name": "x"},
        )
        assert watched_paths(str(tmp_path / "r.yaml"), settings) == [
            str(tmp_path / "r.yaml"),
            "/p.yaml",
            "/c1",
            "/c2",
            "/cas",
        ]
        assert watched_paths(None, settings)[0] == "/p.yaml"


class TestFingerprint:
    def test_unchanged_files_give_the_same_fingerprint(self, tmp_path: Path) -> None:
        """Reading a file again without changing it is not a change."""
        (tmp_path / "f").write_text("allow")
        paths = [str(tmp_path / "f")]
        first = fingerprint(paths)
        (tmp_path / "f").read_text()
        assert fingerprint(paths) == first

    def test_rewrite_rename_and_appearance_are_changes(self, tmp_path: Path) -> None:
        """New content, a file renamed over it (a ConfigMap swap) and a missing file appearing all change it."""
        target, missing = tmp_path / "f", tmp_path / "later"
        target.write_text("allow")
        paths = [str(target), str(missing)]
        seen = [fingerprint(paths)]
        target.write_text("deny!")
        seen.append(fingerprint(paths))
        (tmp_path / "new").write_text("deny!")
        os.utime(tmp_path / "new", ns=(os.stat(target).st_atime_ns, os.stat(target).st_mtime_ns))
        os.replace(tmp_path / "new", target)  # same size and time, another inode
        seen.append(fingerprint(paths))
        missing.write_text("x")
        seen.append(fingerprint(paths))
        assert len(set(seen)) == 4

    def test_directory_entries_count(self, tmp_path: Path) -> None:
        """A file added to, or changed in, a watched directory changes the fingerprint."""
        directory = tmp_path / "crls"
        directory.mkdir()
        (directory / "a.crl").write_text("1")
        paths = [str(directory)]
        seen = [fingerprint(paths)]
        (directory / "b.crl").write_text("2")
        seen.append(fingerprint(paths))
        (directory / "a.crl").write_text("11")
        seen.append(fingerprint(paths))
        assert len(set(seen)) == 3


class TestWatch:
    def test_a_change_requests_one_reload(self, tmp_path: Path, sock_path: str) -> None:
        """Polling asks for a reload once per change and never while nothing changes."""
        config = tmp_path / "r.yaml"
        config.write_text("log_level: warning\n")
        requests: list[str] = []
        settings = _settings(sock_path, 0.1)

        async def scenario() -> list[str]:
            task = asyncio.ensure_future(watch_files(lambda: settings, str(config), requests.append))
            await asyncio.sleep(0.35)
            quiet = list(requests)
            config.write_text("log_level: info\n")
            await asyncio.sleep(0.35)
            task.cancel()
            return quiet

        assert asyncio.run(scenario()) == []
        assert requests == ["watch"]

    def test_off_never_requests(self, tmp_path: Path, sock_path: str) -> None:
        """With reload_watch_seconds 0 a changed file asks for nothing."""
        config = tmp_path / "r.yaml"
        config.write_text("a")
        requests: list[str] = []
        settings = _settings(sock_path, 0)

        async def scenario() -> None:
            task = asyncio.ensure_future(watch_files(lambda: settings, str(config), requests.append))
            await asyncio.sleep(0.05)
            config.write_text("b")
            await asyncio.sleep(0.1)
            task.cancel()

        asyncio.run(scenario())
        assert requests == []

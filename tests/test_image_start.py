"""``snapshotter.image_start``: which files a container of an image opens
first, from its config (no registry: the documents are given)."""

from __future__ import annotations

import json

import pytest

from snapshotter.image_start import DEFAULT_PATH, ImageStart


def test_the_program_is_looked_up_in_the_configs_path_and_path_arguments_follow() -> None:
    start = ImageStart.from_config({"config": {
        "Entrypoint": ["python3"], "Cmd": ["/app/hello.py", "-u", "--opt=x", "data/in.csv"],
        "Env": ["LANG=C.UTF-8", "PATH=/opt/bin:/usr/bin:relative"], "WorkingDir": "/srv",
    }})
    assert start.argv == ("python3", "/app/hello.py", "-u", "--opt=x", "data/in.csv")
    assert start.files() == [
        "/opt/bin/python3", "/usr/bin/python3", "/app/hello.py", "/srv/data/in.csv",
        # what glibc reads at start for LANG=C.UTF-8 and no TZ
        "/usr/lib/locale/locale-archive", "/usr/lib/locale/C.utf8/LC_CTYPE", "/usr/lib/locale/C.UTF-8/LC_CTYPE", "/etc/localtime",
    ]


def test_a_program_with_a_slash_is_taken_from_the_working_dir() -> None:
    start = ImageStart.from_config({"config": {"Cmd": ["./run.sh"], "WorkingDir": "app"}})
    assert start.working_dir == "/app"
    assert start.files() == ["/app/run.sh", "/etc/localtime"]
    assert ImageStart.from_config({"config": {"Cmd": ["../../../etc/x"]}}).files() == ["/etc/x", "/etc/localtime"]


def test_the_c_librarys_files_follow_the_environment() -> None:
    def files(*env: str) -> list[str]:
        return ImageStart.from_config({"config": {"Env": list(env)}}).c_library_files()

    assert files("LANG=C") == ["/etc/localtime"]
    assert files("LANG=de_DE.ISO-8859-15@euro", "LC_ALL=en_US.UTF-8", "TZ=:Europe/Paris") == [
        "/usr/lib/locale/locale-archive", "/usr/lib/locale/en_US.utf8/LC_CTYPE", "/usr/lib/locale/en_US.UTF-8/LC_CTYPE",
        "/usr/share/zoneinfo/Europe/Paris",
    ]
    assert files("LANG=../../etc", "TZ=../../etc/shadow") == []
    assert files("TZ=/etc/tz") == ["/etc/tz"]


def test_a_shell_form_command_names_the_programs_of_its_script() -> None:
    start = ImageStart.from_config({"config": {
        "Cmd": ["/bin/sh", "-c", "gcc -o /tmp/hello /app/hello.c && exec /tmp/hello"], "Env": ["PATH=/usr/bin:/bin"]}})
    assert start.files() == ["/bin/sh", "/usr/bin/gcc", "/bin/gcc", "/tmp/hello", "/app/hello.c", "/etc/localtime"]


def test_defaults_and_junk() -> None:
    start = ImageStart.from_config({"config": {"Cmd": ["sh", 5, None], "Env": "PATH=/nope"}})
    assert start.path == DEFAULT_PATH and start.argv == ("sh",)
    assert start.files()[:2] == ["/usr/local/sbin/sh", "/usr/local/bin/sh"]
    assert ImageStart.from_config({}).files() == []  # no command: nothing starts
    assert ImageStart.from_config({"config": "nonsense"}).files() == []
    assert ImageStart.from_config_bytes(json.dumps({"config": {"Cmd": ["/bin/true"]}}).encode()).files() == ["/bin/true", "/etc/localtime"]
    with pytest.raises(ValueError):
        ImageStart.from_config_bytes(b"[1, 2]")
    with pytest.raises(ValueError):
        ImageStart.from_config_bytes(b"not json")

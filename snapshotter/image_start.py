"""The files a container of an image opens first, from the image config.

A container usually runs its image's ``Entrypoint`` + ``Cmd``: the program
is found through the config's ``PATH`` (as runc's exec does), and
arguments that are paths (``python3 /app/main.py``) are read next. Told
these paths when the image's layers are mounted, the layer mount
processes fetch them, and the shared libraries and interpreters they name,
while the pull and the container's creation are still going on (see
``lazyfs.dependencies``). A guess: a container started with another
command only costs the bytes fetched for it.

Beside the program, the C library's own start-up reads (glibc, which
nearly every image's programs use): the locale the config's environment
names (``setlocale(LC_CTYPE, "")``: the locale archive or the locale's
``LC_CTYPE``) and the local time zone (``/etc/localtime``, or ``TZ``).
"""

from __future__ import annotations

import json
import posixpath
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
LOCALE_DIR = "/usr/lib/locale"
ZONEINFO_DIR = "/usr/share/zoneinfo"
MAX_ARGS = 16  # arguments looked at for paths
MAX_FILES = 64
MAX_SCRIPT_WORDS = 64
SHELLS = frozenset({"sh", "bash", "dash", "ash", "zsh"})
SHELL_SEPARATORS = frozenset({"&&", "||", ";", "|"})


@dataclass(frozen=True)
class ImageStart:
    """What the image config says a container runs, and where."""

    argv: tuple[str, ...]
    path: str = DEFAULT_PATH  # the PATH variable of the config's Env
    working_dir: str = "/"
    locale: str = ""  # LC_ALL, else LC_CTYPE, else LANG
    timezone: str = ""  # TZ

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> ImageStart:
        """From an OCI image config document; missing parts are empty."""
        run = config.get("config") or {}
        if not isinstance(run, Mapping):
            run = {}
        argv = [a for a in (_strings(run.get("Entrypoint")) + _strings(run.get("Cmd")))]
        env = dict(e.split("=", 1) for e in _strings(run.get("Env")) if "=" in e)
        working_dir = run.get("WorkingDir") if isinstance(run.get("WorkingDir"), str) and run.get("WorkingDir") else "/"
        locale = env.get("LC_ALL") or env.get("LC_CTYPE") or env.get("LANG") or ""
        return cls(tuple(argv), env.get("PATH", DEFAULT_PATH), working_dir if working_dir.startswith("/") else "/" + working_dir,
                   locale, env.get("TZ", ""))

    @classmethod
    def from_config_bytes(cls, raw: bytes) -> ImageStart:
        """From the config blob; raises ValueError when it is not JSON."""
        data = json.loads(raw)
        if not isinstance(data, Mapping):
            raise ValueError("the image config is not a JSON object")
        return cls.from_config(data)

    def files(self) -> list[str]:
        """Absolute paths of the program (each place PATH offers) and of the
        arguments that name files; nearest guesses first. For ``sh -c
        SCRIPT`` (a Dockerfile's shell-form CMD), the script's commands too."""
        if not self.argv:
            return []
        files = self._program(self.argv[0]) + self._path_arguments(self.argv[1:MAX_ARGS])
        if posixpath.basename(self.argv[0]) in SHELLS and len(self.argv) >= 3 and self.argv[1] == "-c":
            words = self.argv[2].split()[:MAX_SCRIPT_WORDS]
            for i, word in enumerate(words):
                if i == 0 or words[i - 1] in SHELL_SEPARATORS or words[i - 1] == "exec":
                    if word not in SHELL_SEPARATORS and word != "exec" and "=" not in word:
                        files += self._program(word)
                elif word.startswith("/"):
                    files += self._path_arguments([word])
        files += self.c_library_files()
        return list(dict.fromkeys(f for f in files if len(f) < 4096 and "\0" not in f))[:MAX_FILES]

    def _program(self, name: str) -> list[str]:
        if "/" in name:
            return [self._absolute(name)]
        return [posixpath.join(d, name) for d in self.path.split(":") if d.startswith("/")]

    def _path_arguments(self, args: list[str]) -> list[str]:
        return [self._absolute(a) for a in args
                if a.startswith("/") or (("/" in a or "." in a) and not a.startswith("-") and "=" not in a and " " not in a)]

    def c_library_files(self) -> list[str]:
        """What glibc reads as such a program starts, for this environment."""
        files = []
        if self.locale and self.locale not in ("C", "POSIX") and "/" not in self.locale and ".." not in self.locale:
            files.append(f"{LOCALE_DIR}/locale-archive")
            files += [f"{LOCALE_DIR}/{name}/LC_CTYPE" for name in dict.fromkeys([_normalized_locale(self.locale), self.locale])]
        zone = self.timezone.removeprefix(":")
        if not zone:
            files.append("/etc/localtime")
        elif zone.startswith("/"):
            files.append(posixpath.normpath(zone))
        elif ".." not in zone:
            files.append(posixpath.join(ZONEINFO_DIR, zone))
        return files

    def _absolute(self, path: str) -> str:
        return posixpath.normpath(posixpath.join(self.working_dir, path))


def _normalized_locale(name: str) -> str:
    """glibc's directory name for a locale: the codeset lower-cased without
    punctuation (``C.UTF-8`` -> ``C.utf8``, ``en_US.UTF-8@euro`` -> ``en_US.utf8@euro``)."""
    base, at, modifier = name.partition("@")
    language, dot, codeset = base.partition(".")
    if dot:
        codeset = "".join(ch for ch in codeset.lower() if ch.isalnum())
    return f"{language}{dot}{codeset}{at}{modifier}"


def _strings(value: Any) -> list[str]:
    return [v for v in value if isinstance(v, str)] if isinstance(value, list) else []


def fetch_image_start(repository: str, manifest_digest: str, registry_config: str | None = None) -> ImageStart:
    """The start of the image whose manifest is ``manifest_digest`` in
    ``repository`` (``host/name``); both documents verified by digest.
    Raises the registry client's errors, or ValueError for a bad config."""
    from lazyfs.registry.client import RegistryClient  # noqa: PLC0415 - only the serving process needs it
    from lazyfs.registry.config import RegistryConfig  # noqa: PLC0415

    config = RegistryConfig()
    if registry_config:
        with open(registry_config, encoding="utf-8") as f:
            config = RegistryConfig.from_dict(json.load(f), registry_config)
    with RegistryClient(config) as client:
        repo = client.repository(repository)
        manifest = repo.get_manifest(manifest_digest)
        if manifest.is_index:
            raise ValueError(f"{manifest_digest} is an index, not an image manifest")
        descriptor = manifest.config
        return ImageStart.from_config_bytes(repo.get_blob(descriptor.digest, descriptor.size))


__all__ = ["DEFAULT_PATH", "ImageStart", "fetch_image_start"]

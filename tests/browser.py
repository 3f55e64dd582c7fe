"""A real browser for the tests: headless Chromium (Debian's `chromium`), and the DOM it shows.

`Chromium.dump_dom(url)` loads a page, runs its scripts and returns the DOM as Chromium
serialises it; `parse` reads that with the standard library's HTML parser into a small tree
that tests query by tag and attribute. Each run is its own process group, killed whole if it
outlives its timeout, so no renderer is left behind.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path

import pytest

BINARY = shutil.which("chromium") or shutil.which("chromium-browser")
REASON = "chromium is not installed (Debian: apt-get install chromium; .ci/run installs it)"

# Elements without an end tag in HTML.
_VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}


def require() -> str:
    if BINARY is None:
        pytest.skip(REASON)
    return BINARY


class Chromium:
    def __init__(self, profile: Path) -> None:
        self.binary = require()
        self.profile = profile

    def _run(self, *args: str, timeout: float) -> tuple[float, str]:
        """(seconds taken, stdout) of one headless run."""
        command = [self.binary, "--headless", "--disable-gpu", "--no-first-run", "--no-default-browser-check",
                   "--disable-extensions", "--disable-background-networking", "--disable-sync",
                   f"--user-data-dir={self.profile}", *args]
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            command.insert(1, "--no-sandbox")  # Chromium's sandbox refuses to run as root (CI containers)
        started = time.monotonic()
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                                   start_new_session=True)
        try:
            out, _ = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.communicate()
            raise AssertionError(f"chromium took over {timeout}s: {' '.join(args)}") from None
        finally:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        taken = time.monotonic() - started
        assert process.returncode == 0, f"chromium exited with {process.returncode}"
        return taken, out

    def dump_dom(self, url: str, *, virtual_time_ms: int = 0, timeout: float = 60) -> tuple[float, Element]:
        """(seconds the load took, the DOM after the page's scripts ran). With `virtual_time_ms`,
        timers (the page's refresh) run as if that much time had passed."""
        args = ["--window-size=1280,900"]
        if virtual_time_ms:
            args.append(f"--virtual-time-budget={virtual_time_ms}")
        taken, out = self._run(*args, "--dump-dom", url, timeout=timeout)
        return taken, parse(out)

    def screenshot(self, url: str, path: Path, *, width: int = 1280, height: int = 1400, timeout: float = 60) -> None:
        self._run(f"--window-size={width},{height}", "--hide-scrollbars", f"--screenshot={path}", url,
                  timeout=timeout)
        assert path.is_file() and path.stat().st_size > 0


@dataclass
class Element:
    tag: str
    attrs: dict[str, str] = field(default_factory=dict)
    children: list[Element | str] = field(default_factory=list)

    def text(self) -> str:
        return "".join(child if isinstance(child, str) else child.text() for child in self.children)

    def iter(self):
        yield self
        for child in self.children:
            if isinstance(child, Element):
                yield from child.iter()

    def find_all(self, tag: str, **attrs: str | bool) -> list[Element]:
        """Descendants named `tag` ("*": any) whose attributes have the given values (True: present)."""
        found = []
        for element in self.iter():
            if tag not in ("*", element.tag):
                continue
            if all((name.replace("_", "-") in element.attrs) if value is True
                   else element.attrs.get(name.replace("_", "-")) == value for name, value in attrs.items()):
                found.append(element)
        return found

    def find(self, tag: str, **attrs: str | bool) -> Element:
        found = self.find_all(tag, **attrs)
        assert found, f"no <{tag}> with {attrs}"
        return found[0]

    def by_id(self, ident: str) -> Element:
        return self.find("*", id=ident)


class _TreeBuilder(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.root = Element("#document")
        self.stack = [self.root]

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        element = Element(tag, {name: value or "" for name, value in attrs})
        self.stack[-1].children.append(element)
        if tag not in _VOID:
            self.stack.append(element)

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.stack[-1].children.append(Element(tag, {name: value or "" for name, value in attrs}))

    def handle_endtag(self, tag: str) -> None:
        for depth in range(len(self.stack) - 1, 0, -1):  # close up to the matching element
            if self.stack[depth].tag == tag:
                del self.stack[depth:]
                return

    def handle_data(self, data: str) -> None:
        self.stack[-1].children.append(data)


def parse(html: str) -> Element:
    builder = _TreeBuilder()
    builder.feed(html)
    builder.close()
    return builder.root

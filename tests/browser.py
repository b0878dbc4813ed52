"""Headless Chromium for tests of the HTML pages proxytune writes (the user-study
questionnaire, the evaluation report).

Playwright drives the system's Chromium (Debian's `chromium`; no `playwright install`).
Pages open from file:// with the network emulated off, and every console error, uncaught
exception, failed load and request to the network is collected, so a test can assert that a
page works on its own. Without a Chromium the browser tests skip, unless
PROXYTUNE_REQUIRE_BROWSER=1 (CI) makes that a failure: a skipped browser test proves nothing.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

import pytest

if TYPE_CHECKING:
    from playwright.sync_api import Browser, ConsoleMessage, Page, Request

REQUIRE_ENV = "PROXYTUNE_REQUIRE_BROWSER"
EXECUTABLES = ("chromium", "chromium-browser")
LOCAL_SCHEMES = ("file:", "data:", "blob:", "about:")  # anything else is a network request
VIEWPORT = {"width": 1280, "height": 900}


def chromium_executable() -> str | None:
    """The system's Chromium on PATH, or None."""
    return next((found for name in EXECUTABLES if (found := shutil.which(name))), None)


def browser_unavailable(reason: str) -> NoReturn:
    if os.environ.get(REQUIRE_ENV) == "1":
        pytest.fail(f"{reason} (and {REQUIRE_ENV}=1 requires the browser tests)", pytrace=False)
    pytest.skip(reason)


@dataclass
class BrowserPage:
    """An open page and what went wrong on it so far: console errors, uncaught exceptions,
    failed loads, network requests (one line each)."""

    page: Page
    errors: list[str] = field(default_factory=list)

    def assert_no_errors(self) -> None:
        assert not self.errors, "the page reported errors:\n" + "\n".join(self.errors)

    def watch(self) -> None:
        self.page.on("console", self._console)
        self.page.on("pageerror", lambda error: self.errors.append(f"uncaught: {error}"))
        self.page.on("requestfailed", lambda request: self.errors.append(f"failed to load: {request.url}"))
        self.page.on("request", self._request)

    def _console(self, message: ConsoleMessage) -> None:
        if message.type == "error":
            self.errors.append(f"console: {message.text}")

    def _request(self, request: Request) -> None:
        if not request.url.startswith(LOCAL_SCHEMES):
            self.errors.append(f"network request: {request.url}")


@pytest.fixture(scope="session")
def chromium() -> Iterator[Browser]:
    """One headless Chromium for the session; skips (or fails, see REQUIRE_ENV) without one."""
    executable = chromium_executable()
    if executable is None:
        browser_unavailable(f"no Chromium on PATH ({', '.join(EXECUTABLES)}); apt-get install chromium")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        browser_unavailable("the playwright package is missing; pip install -e '.[dev]'")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable)
        yield browser
        browser.close()


@pytest.fixture
def open_page(chromium: Browser) -> Iterator[Callable[[Path], BrowserPage]]:
    """`open_page(path)` loads a local HTML file in a fresh browser context (own storage,
    network off, downloads accepted) and returns it with its error log; contexts close at
    the end of the test."""
    contexts = []

    def open_(path: Path) -> BrowserPage:
        context = chromium.new_context(offline=True, viewport=VIEWPORT, accept_downloads=True)
        contexts.append(context)
        opened = BrowserPage(context.new_page())
        opened.watch()
        opened.page.goto(Path(path).resolve().as_uri(), wait_until="load")
        return opened

    yield open_
    for context in contexts:
        context.close()


def screenshot(page: Page, tmp_path: Path, name: str = "page") -> Path:
    """A full-page PNG screenshot saved as `tmp_path/<name>.png`, for a look after a failure."""
    path = tmp_path / f"{name}.png"
    page.screenshot(path=path, full_page=True)
    return path

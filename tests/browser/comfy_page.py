"""Drives the real ComfyUI web UI (comfyui-frontend-package 1.32.9 on ComfyUI 0.3.75, 1.49.6 on 0.33) in Debian's headless Chromium via Selenium.

Everything an artist does goes through the page: the Templates sidebar button, the pack's category and card in the
template browser, the Run and Cancel buttons. Reading the page's state uses what the frontend exposes: `window.app`
(the ComfyApp: `app.graph`, `app.graphToPrompt()`), `window.comfyAPI.api.api` (the websocket client whose events
the UI itself renders), the browser tab title (the frontend writes `[N%] <node type>` there while a node reports
progress), and the DOM: PrimeVue dialogs (`.p-dialog`: missing nodes, missing models, errors) and toasts
(`.p-toast-message-error` / `-warn`: e.g. a workflow that fails the frontend's schema validation).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time
from pathlib import Path

CHROMIUM_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--disable-quic", "--window-size=1600,1000",
)
FINISHED_EVENTS = ("execution_success", "execution_error", "execution_interrupted")
RECORDED_EVENTS = ("execution_start", "executing", "executed", "progress", "execution_cached", *FINISHED_EVENTS)
QUEUE_BUTTON_149 = "button[data-testid='queue-button']"
NODE_PROGRESS_IN_TITLE = re.compile(r"\[(\d+)%\] (\S+)$")


class BrowserUnavailable(RuntimeError):
    """Chromium, chromedriver or selenium is missing; the message says what and how to install it."""


def browser_binaries() -> tuple[str, str]:
    """Paths of Debian's chromium and chromedriver (scripts/provision.sh installs both as root)."""
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    missing = [name for name, path in (("chromium", chromium), ("chromedriver", driver)) if path is None]
    if missing:
        raise BrowserUnavailable(
            f"{' and '.join(missing)} not on PATH; as root, `bash scripts/provision.sh` installs them "
            "(apt-get install chromium chromium-driver)"
        )
    try:
        import selenium  # noqa: F401
    except ImportError as err:
        raise BrowserUnavailable("selenium is not installed; run `bash scripts/provision.sh`") from err
    return chromium, driver


def start_chromium(artifacts: Path):
    """A fresh headless Chromium (own throw-away profile) under chromedriver; no downloads, no network."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    chromium, driver_path = browser_binaries()
    options = webdriver.ChromeOptions()
    options.binary_location = chromium  # given explicitly, so Selenium Manager never tries to download a browser
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    profile = tempfile.mkdtemp(prefix="dopsd-chromium-")
    options.add_argument(f"--user-data-dir={profile}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    service = Service(executable_path=driver_path, log_output=str(artifacts / "chromedriver.log"))
    driver = webdriver.Chrome(service=service, options=options)
    driver.set_script_timeout(60)
    driver.set_page_load_timeout(120)  # a page that never finishes loading fails the test instead of hanging it
    driver.dopsd_profile = profile
    return driver


class ComfyPage:
    """One browser tab on a running ComfyUI server."""

    def __init__(self, driver, url: str, artifacts: Path):
        self.driver, self.url, self.artifacts = driver, url, artifacts

    # -- page ---------------------------------------------------------------------------------------------------
    def open(self, timeout: float = 90) -> "ComfyPage":
        self.driver.get(self.url)
        self.wait_until("window.app && window.app.graph && window.app.canvas && window.comfyAPI "
                        "&& document.querySelector('button.templates-tab-button')", timeout, "the ComfyUI page to load")
        # Count the page's requests in flight, for wait_settled (the frontend calls the global fetch each time).
        self.js("""
            const state = window.__dopsdFetch = {inflight: 0, settled: performance.now()};
            const fetch = window.fetch.bind(window);
            window.fetch = (...args) => {
                state.inflight++;
                return fetch(...args).finally(() => { state.inflight--; state.settled = performance.now(); });
            };""")
        # Record what the server sends the UI over its websocket (the same events the UI renders).
        self.js("""
            window.__dopsdEvents = [];
            const api = window.comfyAPI.api.api;
            for (const name of arguments[0])
                api.addEventListener(name, e => window.__dopsdEvents.push([name, Date.now(), e.detail]));
        """, list(RECORDED_EVENTS))
        return self

    def js(self, script: str, *args):
        return self.driver.execute_script(script, *args)

    def wait_until(self, condition_js: str, timeout: float, what: str, interval: float = 0.25):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = self.js(f"return ({condition_js})")
            if value:
                return value
            time.sleep(interval)
        self.screenshot("timeout")
        raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")

    def wait_settled(self, what: str, quiet: float = 0.5, timeout: float = 30) -> None:
        """Wait until every request the page sent has been answered, no new one for `quiet` seconds, and two
        frames have been drawn since: the frontend's asynchronous checks after a load (it asks the server for the
        model folders before deciding on a missing-models warning) have finished and their dialogs are in the DOM.
        A positive signal, unlike a fixed sleep, so a slow machine cannot pass an absence check early."""
        self.wait_until(f"window.__dopsdFetch.inflight === 0 && performance.now() - window.__dopsdFetch.settled > "
                        f"{quiet * 1000}", timeout, what)
        self.driver.execute_async_script("const done = arguments[arguments.length - 1];"
                                         "requestAnimationFrame(() => requestAnimationFrame(() => done(true)))")

    def screenshot(self, name: str) -> Path:
        path = self.artifacts / f"{name}.png"
        self.driver.save_screenshot(str(path))
        return path

    def save_console_log(self) -> Path:
        path = self.artifacts / "browser_console.log"
        with open(path, "a") as f:
            for entry in self.driver.get_log("browser"):
                f.write(f"{entry['level']} {entry['message']}\n")
        return path

    def click(self, css: str | None = None, xpath: str | None = None, timeout: float = 30):
        """A real mouse click on the element; toasts that cover it are closed first, as a user would."""
        from selenium.common.exceptions import ElementClickInterceptedException
        from selenium.webdriver.common.by import By

        by, selector = (By.CSS_SELECTOR, css) if css else (By.XPATH, xpath)
        deadline = time.monotonic() + timeout
        while True:
            elements = [e for e in self.driver.find_elements(by, selector) if e.is_displayed()]
            if elements:
                try:
                    elements[0].click()
                    return
                except ElementClickInterceptedException:
                    self.close_toasts()
            if time.monotonic() > deadline:
                self.screenshot("click_timeout")
                raise TimeoutError(f"no clickable element {selector}")
            time.sleep(0.25)

    # -- what the user sees ---------------------------------------------------------------------------------------
    def dialogs(self) -> list[str]:
        """Texts of the open dialogs (missing nodes, missing models, error reports, the template browser), and of
        the error overlay frontend 1.49 shows for missing nodes instead of a dialog."""
        return self.js("return [...document.querySelectorAll('.p-dialog, [data-testid=error-overlay]')]"
                       ".filter(d => d.offsetParent !== null).map(d => d.innerText)")

    def toasts(self, severities=("error", "warn")) -> list[str]:
        return self.js("return [...document.querySelectorAll('.p-toast-message')]"
                       ".filter(t => arguments[0].some(s => t.classList.contains('p-toast-message-' + s)))"
                       ".map(t => t.innerText)", list(severities))

    def close_toasts(self) -> None:
        self.js("document.querySelectorAll('.p-toast-close-button').forEach(b => b.click())")

    def title_node_progress(self) -> tuple[int, str] | None:
        """(percent, node type) the tab title shows for the running node, e.g. '[42%] DOPSDTrain'."""
        match = NODE_PROGRESS_IN_TITLE.search(self.driver.title)
        return (int(match.group(1)), match.group(2)) if match else None

    # -- workflows ------------------------------------------------------------------------------------------------
    def open_template(self, pack: str, name: str, expected_nodes: int, timeout: float = 60) -> None:
        """Templates sidebar button -> the pack's category under Extensions -> the workflow's card."""
        self.click(css="button.templates-tab-button")
        self.click(xpath=f"//div[@role='button'][.//span[normalize-space()='{pack}']]")
        self.click(css=f"[data-testid='template-workflow-{name}']")
        self.wait_until(f"window.app.graph.nodes.length === {expected_nodes} "
                        "&& !document.querySelector('[data-testid=template-workflows-content]')",
                        timeout, f"the workflow {name} to load")
        self.wait_settled(f"the checks that follow loading {name} (missing models)")

    def load_graph_data(self, workflow: dict) -> None:
        """What dropping a workflow file on the canvas does: app.loadGraphData with the UI's default dialogs on."""
        self.js("window.__dopsdLoad = window.app.loadGraphData(arguments[0])", workflow)
        self.driver.execute_async_script("window.__dopsdLoad.then(() => arguments[arguments.length - 1](true))")
        self.wait_settled("the checks that follow loading a workflow (missing nodes and models)")

    def nodes(self) -> list[dict]:
        return self.js("""return window.app.graph.nodes.map(n => ({
            id: String(n.id), type: n.type, mode: n.mode,
            widgets: Object.fromEntries((n.widgets || []).map(w => [w.name, w.value])),
            unavailable: (n.widgets || []).filter(w => w.type === 'combo' && Array.isArray(w.options?.values)
                                                   && !w.options.values.includes(w.value))
                                          .map(w => `${w.name}=${JSON.stringify(w.value)}`)}))""")

    def canvas_boxes(self) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
        """[x, y, width, height] as drawn: every node's (title bar included) by id, every group's by title."""
        return tuple(self.js("""
            const title = window.LiteGraph.NODE_TITLE_HEIGHT;
            const nodes = Object.fromEntries(window.app.graph.nodes.map(n =>
                [String(n.id), [n.pos[0], n.pos[1] - title, n.size[0], n.size[1] + title]]));
            const groups = Object.fromEntries(window.app.graph.groups.map(g => [g.title, Array.from(g._bounding)]));
            return [nodes, groups];"""))

    def node_text(self, node_id: str) -> str | None:
        """The text the canvas shows on a node for the server's progress text (the frontend's text-preview widget)."""
        return self.js("""
            const node = window.app.graph.getNodeById(Number(arguments[0]));
            const widget = (node?.widgets || []).find(w => w.name === '$$node-text-preview');
            return widget ? widget.value : null;""", node_id)

    def set_widgets(self, node_id: str, values: dict) -> None:
        missing = self.js("""
            const node = window.app.graph.getNodeById(Number(arguments[0]));
            const missing = [];
            for (const [name, value] of Object.entries(arguments[1])) {
                const widget = (node.widgets || []).find(w => w.name === name);
                if (!widget) { missing.push(name); continue; }
                widget.value = value;
                widget.callback?.(value);
            }
            node.setDirtyCanvas(true, true);
            return missing;""", node_id, values)
        if missing:
            raise KeyError(f"node {node_id} has no widgets {missing}")

    def queued_prompt(self) -> dict:
        """The API-format graph the UI would send on Run (app.graphToPrompt)."""
        return self.driver.execute_async_script(
            "window.app.graphToPrompt().then(p => arguments[arguments.length - 1](p.output))")

    # -- running --------------------------------------------------------------------------------------------------
    def events(self, *names: str) -> list:
        return self.js("return window.__dopsdEvents.filter(e => arguments[0].includes(e[0]))", list(names))

    def clear_events(self) -> None:
        self.js("window.__dopsdEvents.length = 0")

    def run(self, started_within: float = 60) -> float:
        """Click Run (the queue button); returns the click time (time.time()). Fails, instead of waiting for a run
        that never comes, when the server reports no start of execution within `started_within` seconds.

        The button: frontend 1.32.9 labels it aria-label="Run"; 1.49 gives it data-testid="queue-button" (text "Run")
        and puts aria-label="Run" on the run-mode menu's trigger beside it, which only opens a menu."""
        self.close_toasts()
        if self.driver.find_elements("css selector", QUEUE_BUTTON_149):
            self.click(css=QUEUE_BUTTON_149)
        else:
            self.click(xpath="//button[@aria-label='Run']")
        clicked = time.time()
        self.wait_until("window.__dopsdEvents.some(e => e[0] === 'execution_start')", started_within,
                        "the run to start after clicking Run (did the click queue anything?)")
        return clicked

    def cancel(self) -> float:
        """Click the 'Cancel current run' button of the queue bar (the UI posts /interrupt); returns the time just
        before the click (time.time())."""
        started = time.time()
        self.click(xpath="//button[@aria-label='Cancel current run']")
        return started

    def wait_finished(self, timeout: float) -> tuple[str, dict]:
        """The first finished-event (success, error, interrupted) since the last clear_events."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            finished = self.events(*FINISHED_EVENTS)
            if finished:
                name, _, detail = finished[0]
                return name, detail
            time.sleep(0.25)
        self.screenshot("run_timeout")
        raise TimeoutError(f"the run did not finish within {timeout:.0f}s")

    def fit_view(self, width: int = 3000, height: int = 1900) -> None:
        """Enlarge the window (so the fitted canvas is drawn with its text, not in low-detail mode), close the
        minimap, and fit the whole graph into view."""
        self.driver.set_window_size(width, height)
        self.js("document.querySelectorAll('[aria-label^=\"Hide Minimap\"]').forEach(b => b.click())")
        time.sleep(0.5)
        self.click(xpath="//button[@aria-label='Fit View (.)']")
        time.sleep(1.0)

    def close(self) -> None:
        try:
            self.save_console_log()
        finally:
            profile = getattr(self.driver, "dopsd_profile", None)
            self.driver.quit()
            if profile:
                shutil.rmtree(profile, ignore_errors=True)


def write_settings(base: Path, **settings) -> None:
    """Merge frontend settings into the base directory's default user (what the Settings dialog stores)."""
    path = base / "user" / "default" / "comfy.settings.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    current = json.loads(path.read_text()) if path.is_file() else {}
    path.write_text(json.dumps({**current, **settings}, indent=4))


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")

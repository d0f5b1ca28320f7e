"""Open an HTML report in headless Chromium and say what a reader would see.

Drives Chromium through the DevTools protocol (``--remote-debugging-port``; the websocket client is
aiohttp's, already in the locked environment): loads the file, waits for every ``<audio>`` to load
its metadata, and returns what the page did — images and their natural size, audio ready state and
duration, console errors, uncaught exceptions, dialogs (``alert``), every request that was not a
``data:`` URI or the file itself, the document title, the visible text and the tables.

Used by tests/test_report.py and tests/test_compare.py; ``.ci/chromium-up`` installs Chromium
(Debian package ``chromium``); :func:`chromium_path` is ``None`` where it is absent.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

#: what the page reports once every <audio> has its metadata (or failed, or timed out)
PAGE_PROBE = r"""
(async () => {
  const deadline = Date.now() + TIMEOUT_MS;
  const audios = [...document.querySelectorAll('audio')];
  for (const a of audios) { if (a.readyState < 1 && !a.error) a.load(); }
  while (Date.now() < deadline && audios.some(a => a.readyState < 1 && !a.error)) {
    await new Promise(r => setTimeout(r, 50));
  }
  const imgs = [...document.images];
  await Promise.all(imgs.map(i => i.complete ? null : new Promise(r => { i.onload = i.onerror = r; })));
  const cellText = c => c.innerText.trim();
  return {
    title: document.title,
    text: document.body.innerText,
    images: imgs.map(i => ({alt: i.alt, src: i.src.slice(0, 40), complete: i.complete,
                            naturalWidth: i.naturalWidth, naturalHeight: i.naturalHeight})),
    audio: audios.map(a => ({src: a.currentSrc.slice(0, 40), readyState: a.readyState, duration: a.duration,
                             error: a.error ? a.error.code : null})),
    scripts: document.scripts.length,
    tables: [...document.querySelectorAll('table')].map(t => ({
      id: t.id, className: t.className,
      head: [...t.querySelectorAll('thead tr')].map(r => [...r.cells].map(
        c => ({text: cellText(c), colspan: c.colSpan, rowspan: c.rowSpan}))),
      rows: [...t.querySelectorAll('tbody tr, tfoot tr')].map(r => [...r.cells].map(cellText)),
    })),
  };
})()
"""


def chromium_path() -> str | None:
    """The Chromium binary (``$CHROMIUM``, else ``chromium``/``chromium-browser``/``google-chrome`` on
    PATH), or ``None``."""
    for name in (os.environ.get("CHROMIUM"), "chromium", "chromium-browser", "google-chrome"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


class _Devtools:
    def __init__(self, ws):
        self.ws, self.next_id, self.pending, self.events = ws, 0, {}, []

    async def send(self, method: str, params: dict | None = None, session: str | None = None) -> dict:
        self.next_id += 1
        fut = asyncio.get_running_loop().create_future()
        self.pending[self.next_id] = fut
        msg = {"id": self.next_id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        await self.ws.send_str(json.dumps(msg))
        return await fut

    async def pump(self, on_event) -> None:
        async for msg in self.ws:
            data = json.loads(msg.data)
            if "id" in data and data["id"] in self.pending:
                fut = self.pending.pop(data["id"])
                if "error" in data:
                    fut.set_exception(RuntimeError(f"devtools: {data['error']}"))
                else:
                    fut.set_result(data.get("result", {}))
            elif "method" in data:
                self.events.append(data)
                await on_event(data)


async def _inspect(chromium: str, url: str, timeout: float) -> dict[str, Any]:
    import aiohttp

    profile = tempfile.mkdtemp(prefix="higgs-tune-chromium-")
    proc = subprocess.Popen(
        [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
         "--no-default-browser-check", "--mute-audio", "--disable-extensions", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--remote-debugging-port=0",
         f"--user-data-dir={profile}", "about:blank"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        port_file = Path(profile) / "DevToolsActivePort"
        deadline = time.monotonic() + 60
        while not (port_file.exists() and len(port_file.read_text().splitlines()) >= 2):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{chromium} did not start its DevTools endpoint (exit {proc.poll()})")
            await asyncio.sleep(0.1)
        port, path = port_file.read_text().splitlines()[:2]
        async with aiohttp.ClientSession() as http, http.ws_connect(f"ws://127.0.0.1:{port}{path}",
                                                                     max_msg_size=0) as ws:
            dt = _Devtools(ws)
            result: dict[str, Any] = {"console_errors": [], "exceptions": [], "dialogs": [], "requests": [],
                                      "failed_requests": []}
            loaded = asyncio.Event()
            session = None

            async def on_event(ev):
                method, p = ev["method"], ev.get("params", {})
                if method == "Page.loadEventFired":
                    loaded.set()
                elif method == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
                    result["console_errors"].append(" ".join(str(a.get("value", a.get("description", "")))
                                                             for a in p.get("args", [])))
                elif method == "Runtime.exceptionThrown":
                    d = p.get("exceptionDetails", {})
                    result["exceptions"].append(d.get("exception", {}).get("description") or d.get("text"))
                elif method == "Log.entryAdded" and p.get("entry", {}).get("level") == "error":
                    result["console_errors"].append(p["entry"].get("text"))
                elif method == "Page.javascriptDialogOpening":
                    result["dialogs"].append(p.get("message"))
                    asyncio.ensure_future(dt.send("Page.handleJavaScriptDialog", {"accept": False}, session))
                elif method == "Network.requestWillBeSent":
                    u = p.get("request", {}).get("url", "")
                    if not u.startswith("data:") and u != url:
                        result["requests"].append(u)
                elif method == "Network.loadingFailed":
                    result["failed_requests"].append(p.get("errorText"))

            pump = asyncio.ensure_future(dt.pump(on_event))
            target = await dt.send("Target.createTarget", {"url": "about:blank"})
            session = (await dt.send("Target.attachToTarget", {"targetId": target["targetId"],
                                                               "flatten": True}))["sessionId"]
            for domain in ("Page", "Runtime", "Network", "Log"):
                await dt.send(f"{domain}.enable", {}, session)
            await dt.send("Page.navigate", {"url": url}, session)
            await asyncio.wait_for(loaded.wait(), timeout)
            probe = PAGE_PROBE.replace("TIMEOUT_MS", str(int(timeout * 1000)))
            res = await dt.send("Runtime.evaluate", {"expression": probe, "awaitPromise": True,
                                                     "returnByValue": True}, session)
            if "exceptionDetails" in res:
                raise RuntimeError(f"page probe failed: {res['exceptionDetails']}")
            result.update(res["result"]["value"])
            await asyncio.sleep(0.2)  # late console messages
            pump.cancel()
            return result
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        shutil.rmtree(profile, ignore_errors=True)


def inspect_page(html: str | Path, timeout: float = 60.0, chromium: str | None = None) -> dict[str, Any]:
    """Load ``html`` (a file) in headless Chromium and return what it did.

    Returns ``{"title", "text" (body innerText), "images": [{alt, src (first 40 chars), complete,
    naturalWidth, naturalHeight}], "audio": [{src, readyState, duration, error}], "scripts" (count),
    "tables": [{id, className, head: [[{text, colspan, rowspan}]], rows: [[cell text]]}],
    "console_errors", "exceptions", "dialogs" (alert/confirm messages), "requests" (URLs fetched
    other than ``data:`` URIs and the file itself), "failed_requests"}``.

    Raises:
        RuntimeError: Chromium is absent or did not start, or the page could not be probed.
        asyncio.TimeoutError: the page did not fire ``load`` within ``timeout`` seconds.
    """
    chromium = chromium or chromium_path()
    if not chromium:
        raise RuntimeError("no Chromium: install it with .ci/chromium-up (Debian package chromium)")
    url = Path(html).resolve().as_uri()
    return asyncio.run(_inspect(chromium, url, timeout))


def table_by_id(page: dict, table_id: str) -> dict:
    """The table of :func:`inspect_page` with that ``id``.

    Raises:
        KeyError: no such table.
    """
    for t in page["tables"]:
        if t["id"] == table_id:
            return t
    raise KeyError(f"no table with id {table_id!r}; ids: {[t['id'] for t in page['tables'] if t['id']]}")


def html_tables(html: str) -> dict[str, dict]:
    """The ``<table id=...>`` elements of ``html`` parsed without a browser (stdlib ``html.parser``):
    ``{id: {"head": [[cell text]], "body": [[cell text]], "groups": [(group header, [[row cells]])]}}``
    (``groups``: one per ``<tbody>``, its header the text of a lone ``th.group`` row)."""
    from html.parser import HTMLParser

    class P(HTMLParser):
        def __init__(self):
            super().__init__(convert_charrefs=True)
            self.tables, self.stack, self.cell, self.row, self.part = {}, [], None, None, None

        def handle_starttag(self, tag, attrs):
            a = dict(attrs)
            if tag == "table":
                t = {"id": a.get("id") or "", "head": [], "body": [], "groups": []}
                self.stack.append(t)
                if t["id"]:
                    self.tables[t["id"]] = t
            elif not self.stack:
                return
            elif tag in ("thead", "tfoot"):
                self.part = "head" if tag == "thead" else "body"
            elif tag == "tbody":
                self.part = "body"
                self.stack[-1]["groups"].append([None, []])
            elif tag == "tr":
                self.row = []
            elif tag in ("td", "th"):
                self.cell = {"text": "", "group": "group" in (a.get("class") or "").split()}

        def handle_endtag(self, tag):
            if not self.stack:
                return
            t = self.stack[-1]
            if tag in ("td", "th") and self.cell is not None and self.row is not None:
                self.row.append(self.cell)
                self.cell = None
            elif tag == "tr" and self.row is not None:
                texts = [c["text"].strip() for c in self.row]
                if self.part == "head":
                    t["head"].append(texts)
                else:
                    t["body"].append(texts)
                    if t["groups"]:
                        g = t["groups"][-1]
                        if len(self.row) == 1 and self.row[0]["group"]:
                            g[0] = texts[0]
                        else:
                            g[1].append(texts)
                self.row = None
            elif tag in ("thead", "tbody", "tfoot"):
                self.part = None
            elif tag == "table":
                self.stack.pop()

        def handle_data(self, data):
            if self.cell is not None:
                self.cell["text"] += data

    p = P()
    p.feed(html)
    for t in p.tables.values():
        t["groups"] = [tuple(g) for g in t["groups"]]
    return p.tables

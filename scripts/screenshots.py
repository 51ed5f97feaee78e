"""Screenshots of the explorer for the README: serve a store, open its pages in Debian's chromium through
Playwright, save PNGs.

    .venv/bin/python scripts/screenshots.py STORE_DIR [--out docs/screenshots]
"""

from __future__ import annotations

import argparse
import re
import socket
import threading
import time
from pathlib import Path

import uvicorn
from playwright.sync_api import sync_playwright

from actdb.query.serve.app import create_app
from actdb.store.config import StoreConfig


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("store", type=Path)
    ap.add_argument("--out", type=Path, default=Path("docs/screenshots"))
    ap.add_argument("--try-text", default='def f(x):\n    return x + 1  # "<b>" & more')
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(StoreConfig.resolve(args.store, None)), host="127.0.0.1", port=port, log_level="warning"
        )
    )
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    base = f"http://127.0.0.1:{port}"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.goto(base + "/universal")
        neuron = page.locator("main table tbody tr td a").first.get_attribute("href")
        shots = {
            "home": "/",
            "universal": "/universal",
            "neuron": neuron,
            "similarity": "/similarity",
            "persistence": "/persistence",
            "sql": "/sql?q=SELECT+model%2C+step%2C+count(*)+AS+n_universal+FROM+v_universal_neurons+GROUP+BY+1%2C+2",
        }
        for name, path in shots.items():
            page.goto(base + path)
            page.screenshot(path=args.out / f"{name}.png", full_page=name != "neuron")
            print(f"{args.out / name}.png  <- {path}")
        page.goto(base + neuron)
        page.fill("#try-text", args.try_text)
        page.click("section[aria-labelledby=try-h] button")
        page.wait_for_url(re.compile(r".*/try\?.*"), timeout=300_000)
        page.screenshot(path=args.out / "try.png", full_page=True)
        print(f"{args.out / 'try'}.png  <- {page.url.removeprefix(base)}")
        browser.close()
    server.should_exit = True


if __name__ == "__main__":
    main()

"""`actdb serve` without a browser: every page over a real store (two tiny seeds at two steps, correlated,
persisted, explained), downloads, bad input as 400/404 pages, static files that stay inside their folder, the
security headers, markup in text shown as text, the read-only door, and `actdb activations` against an unhooked
forward pass."""

from __future__ import annotations

import csv
import io
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from urllib.parse import quote

import numpy as np
import pytest
import torch

from actdb.store.config import StoreConfig
from tests.conftest import cli_runner


@pytest.fixture(scope="module")
def served_store(tmp_path_factory, tokenizer_dir, text_dir, tiny_models):
    """Models a and b (tiny GPT-2 seeds), steps 0 and 1 with different weights, correlated at both steps,
    persistence and similarity computed, examples and explanations kept."""
    from actdb.store.ingest.zoo import save_tiny_model

    root = tmp_path_factory.mktemp("served")
    sources = {}
    for name, seed in (("a", 0), ("b", 7)):
        for step in (0, 1):
            if name == "a" and step == 0:
                sources[(name, step)] = shutil.copytree(tiny_models["gpt2"], root / f"{name}{step}")
            else:
                sources[(name, step)] = save_tiny_model("gpt2", root / f"{name}{step}", tokenizer_dir, seed=seed + step)
    home, db = root / "store", f"sqlite:///{root}/store/actdb.sqlite"
    run = cli_runner(home, db)
    run("init")
    run("dataset", "add", "d", text_dir, "--tokenizer", tokenizer_dir, "--seq-len", 64, "--tokens", 2048)
    for (name, step), src in sources.items():
        run(
            "ingest",
            name,
            "--step",
            step,
            "--dataset",
            "d",
            "--source",
            src,
            "--quiet",
            "--top-k",
            8,
            *(("--replace-source",) if step else ()),
        )
    for step in (0, 1):
        run(
            "correlate",
            "--dataset",
            "d",
            "--step",
            step,
            "--models",
            "a,b",
            "--threshold",
            0.05,
            "--baseline-draws",
            2,
            "--quiet",
        )
    run("persistence", "--model", "a", "--quiet")
    run("similarity", "--dataset", "d", "--models", "a,b", "--steps", "0,1", "--quiet")
    return StoreConfig.resolve(home, db), sources


@pytest.fixture(scope="module")
def client(served_store):
    from starlette.testclient import TestClient

    from actdb.query.serve.app import create_app

    config, _sources = served_store
    with TestClient(create_app(config, device="cpu"), raise_server_exceptions=False) as c:
        yield c


def _first_universal(client) -> str:
    page = client.get("/universal?sort=excess")
    assert page.status_code == 200
    return re.search(r'href="(/neuron/[^"]+)"', page.text).group(1)


def test_home_shows_the_grid_runs_and_dataset_with_security_headers(client):
    r = client.get("/")
    assert r.status_code == 200
    assert "Universality share" in r.text and "step 0" in r.text and "step 1" in r.text
    # the grid reads each set's canonical run (newest_runs), and says so: the widest, not the newest
    assert "canonical cross-model run without control (the widest run that scored the set, the newest" in r.text
    assert "newest cross-model run" not in r.text
    assert re.search(r'href="/universal\?model=a&amp;step=0">\d+\.\d%', r.text)
    # the newest runs, newest first, in a few columns; all of them on /runs
    shown = [
        int(x)
        for x in re.findall(
            r"<tr>\s*<td>(\d+)</td>\s*<td class=\"text\">(?:cross_model|within_model|similarity)", r.text
        )
    ]
    every = client.get("/runs?format=csv").text.strip().splitlines()[1:]
    assert shown and shown == sorted(shown, reverse=True) and len(shown) == min(10, len(every))
    assert f"newest of {len(every)} correlation runs" in r.text and "read_amplification" not in r.text
    csp = r.headers["content-security-policy"]
    assert "script-src 'none'" in csp and "default-src 'none'" in csp
    assert r.headers["x-content-type-options"] == "nosniff"


def test_neuron_page_links_twin_and_other_step(client):
    url = _first_universal(client)
    page = client.get(url)
    assert page.status_code == 200, page.text
    text = page.text
    assert "Top activating contexts" in text and 'class="tok ' in text and "<svg" in text
    model, step, cell = re.match(r"/neuron/(\w+)@(\d+)/(\d+\.\d+)", url).groups()
    other_model = "b" if model == "a" else "a"
    twin = re.search(rf'href="(/neuron/{other_model}@{step}/\d+\.\d+)"', text)
    assert twin and client.get(twin.group(1)).status_code == 200
    other_step = "1" if step == "0" else "0"
    assert f'href="/neuron/{model}@{other_step}/{cell}"' in text
    assert "self corr" in text
    matches = client.get(url, params={"format": "csv", "table": "matches"})
    assert matches.headers["content-disposition"].endswith('-matches.csv"')
    rows = list(csv.DictReader(io.StringIO(matches.text)))
    assert {r["other_model"] for r in rows} == {other_model, model}  # the other seed, and itself at the other step
    assert client.get(url, params={"format": "csv"}).status_code == 400
    assert client.get(url, params={"format": "parquet", "table": "examples"}).content[:4] == b"PAR1"


def test_universal_list_filters_sorts_pages_and_downloads(client, served_store):
    every = client.get("/universal?per_page=500").text
    total = int(re.search(r"<p>(\d+) neurons", every).group(1))
    assert total > 2
    one = client.get("/universal?per_page=1&page=2&sort=layer")
    assert one.status_code == 200 and "page 2 of" in one.text
    assert one.text.count('href="/neuron/') == 1
    layer0 = client.get("/universal?layer=0&model=a&step=0&format=csv")
    assert layer0.headers["content-type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(layer0.text)))
    assert rows and {r["layer"] for r in rows} == {"0"} and {r["model"] for r in rows} == {"a"}
    assert all(float(r["excess_corr"]) > float(r["threshold"]) for r in rows)
    parquet = client.get("/universal?layer=0&model=a&step=0&format=parquet")
    import pandas as pd

    frame = pd.read_parquet(io.BytesIO(parquet.content))
    assert len(frame) == len(rows) and list(frame.columns) == list(rows[0])
    post = client.get("/universal?hook=mlp.post&per_page=500").text
    assert int(re.search(r"<p>(\d+) neurons", post).group(1)) == total  # the served store has mlp.post sets only
    pre = client.get("/universal?hook=mlp.pre").text
    assert re.search(r"<p>0 neurons", pre) and "<option selected>mlp.pre</option>" in pre
    assert client.get("/universal?hook=mlp.mid").status_code == 400


def _a_top_token(config) -> str:
    """The token some explained neuron fires on most (as the search reads it)."""
    from actdb.query.explanations import explained_neurons
    from actdb.store.database.connection import Store

    store = Store.open(config, read_only=True)
    try:
        return explained_neurons(store)[0]["token"][1:-1]  # quoted
    finally:
        store.close()


def test_lists_search_similarity_persistence_and_their_downloads(client, served_store):
    token = _a_top_token(served_store[0])
    for url in ("/runs", "/ablations", "/similarity", "/persistence", f"/search?token={quote(token)}"):
        r = client.get(url)
        assert r.status_code == 200, (url, r.text[:300])
        if url != "/ablations":
            got = client.get(url + ("&" if "?" in url else "?") + "format=csv")
            assert got.status_code == 200 and got.text.count("\n") >= 2, url
    heat = client.get("/similarity").text
    pair = re.search(r'<a href="(/similarity/pair\?[^"]+)" aria-label="([^"]+)"', heat)
    assert pair and ": " in pair.group(2)
    assert client.get(pair.group(1).replace("&amp;", "&")).status_code == 200


@pytest.mark.parametrize(
    ("url", "status"),
    [
        ("/neuron/zz@0/0.0", 404),
        ("/neuron/a@0/9.0", 404),
        ("/neuron/a@0/0.100000", 404),
        ("/neuron/a@7/0.0", 404),
        ("/neuron/a@x/0.0", 400),
        ("/neuron/a@0/zero", 400),
        ("/universal?layer=-1", 400),
        ("/universal?sort=nope", 400),
        ("/universal?min_excess=abc", 400),
        ("/universal?format=xls", 400),
        ("/similarity?metric=x", 400),
        ("/no/such/page", 404),
    ],
)
def test_bad_addresses_are_one_line_pages_never_tracebacks(client, url, status):
    r = client.get(url)
    assert r.status_code == status
    assert "Traceback" not in r.text and 'class="error"' in r.text


@pytest.mark.parametrize(
    "path",
    [
        "/static/../app.py",
        "/static/%2e%2e/app.py",
        "/static/%2E%2E/%2E%2E/pages.py",
        "/static/..%2fapp.py",
        "/static/%2e%2e%2fapp.py",
        "/static/....//app.py",
        "/static//etc/passwd",
    ],
)
def test_static_files_stay_inside_their_folder(client, path):
    r = client.get(path)
    assert r.status_code == 404 and "def " not in r.text and "root:" not in r.text


def test_static_stylesheet_is_served(client):
    r = client.get("/static/style.css")
    assert r.status_code == 200 and "text/css" in r.headers["content-type"]


def test_sql_page_runs_the_door_shows_refusals_and_markup_as_text(client, served_store):
    r = client.get("/sql", params={"q": "SELECT '<script>alert(1)</script> & \"q\"' AS x"})
    assert r.status_code == 200
    assert "&lt;script&gt;alert(1)&lt;/script&gt; &amp; &#34;q&#34;" in r.text and "<script>" not in r.text
    refused = client.get("/sql", params={"q": "DELETE FROM model"})
    assert refused.status_code == 400
    (line,) = re.findall(r'<p class="error" role="alert">(.*?)</p>', refused.text, re.S)
    assert "\n" not in line.strip() and line.strip()
    config, _ = served_store
    from actdb.store.database.connection import Store

    store = Store.open(config, read_only=True)
    assert store.scalar(__import__("sqlalchemy").text("SELECT count(*) FROM model")) == 2
    store.close()
    got = client.get("/sql", params={"q": "SELECT name FROM model ORDER BY name", "format": "csv"})
    assert got.text.splitlines() == ["name", "a", "b"]
    assert "v_universality" in client.get("/sql").text


def test_try_text_equals_an_unhooked_forward_pass_and_escapes_markup(client, served_store):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config, sources = served_store
    text = 'x = "<script>" & y'
    r = client.get("/neuron/a@0/1.5/try", params={"text": text})
    assert r.status_code == 200, r.text
    assert "<script>" not in r.text.split("<textarea", 1)[1] and "&lt;script&gt;" in r.text
    assert "a@1 1.5" in r.text  # the same neuron at the other step, loaded too
    values = [float(v) for v in re.findall(r'<td class="[an]\d">([-0-9.e]+)</td>', r.text.split("<tbody>")[1])]
    model = AutoModelForCausalLM.from_pretrained(sources[("a", 0)]).eval()
    tok = AutoTokenizer.from_pretrained(sources[("a", 0)])
    ids = tok(text, add_special_tokens=False)["input_ids"]
    bos = [tok.bos_token_id] if tok.bos_token_id is not None else []
    kept = {}
    handle = model.transformer.h[1].mlp.c_proj.register_forward_pre_hook(lambda _m, a: kept.setdefault("x", a[0]))
    with torch.no_grad():
        model(torch.tensor([bos + ids]))
    handle.remove()
    expected = kept["x"][0, len(bos) :, 5].numpy()
    n_probes = len(values) // len(ids)
    shown = np.array(values).reshape(len(ids), n_probes)[:, 0]
    np.testing.assert_allclose(shown, expected, rtol=1e-3, atol=1e-3)  # the page shows 4 significant digits


def test_try_text_bounds_and_missing_weights(client, served_store, tmp_path):
    long = client.get("/neuron/a@0/1.5/try", params={"text": "x" * 2001})
    assert long.status_code == 400 and "at most 2000" in long.text


def test_activations_cli_and_gone_weights(served_store, tmp_path):
    from transformers import AutoTokenizer

    from actdb.store.token_text import quoted, token_bytes

    config, sources = served_store
    run = cli_runner(config.home, config.database_url)
    out = run("activations", "a@0", "--text", "def f(x):", "--neurons", "1.5,0.2", "--format", "csv").stdout
    rows = list(csv.DictReader(io.StringIO(out)))
    assert rows and list(rows[0]) == ["position", "token", "a@0 1.5", "a@0 0.2"]
    text = "for i in range(3):\n    x"
    tokenizer = AutoTokenizer.from_pretrained(sources[("a", 0)])
    expected = [quoted(raw) for raw in token_bytes(tokenizer, tokenizer(text, add_special_tokens=False)["input_ids"])]
    assert any(t.startswith("' ") for t in expected)  # whitespace the table must show
    shown = run("activations", "a@0", "--text", text, "--neurons", "1.5", "--format", "csv").stdout
    assert [r["token"] for r in csv.DictReader(io.StringIO(shown))] == expected  # the form `neuron` shows
    table = run("activations", "a@0", "--text", text, "--neurons", "1.5").stdout
    assert all(t in table for t in expected)
    bad = run("activations", "a@0", "--text", "x", "--neurons", "9.0", ok=False)
    assert bad.exit_code == 1 and bad.stderr.count("\n") == 1 and "does not exist" in bad.stderr
    moved = sources[("b", 1)].with_name("b1-moved")
    sources[("b", 1)].rename(moved)
    try:
        gone = run("activations", "b@1", "--text", "x", "--neurons", "0.0", ok=False)
    finally:
        moved.rename(sources[("b", 1)])
    assert gone.exit_code == 1 and gone.stderr.count("\n") == 1 and "are gone" in gone.stderr


def test_serve_refuses_a_missing_store_in_one_line(tmp_path):
    from tests.conftest import cli_call

    r = cli_call(tmp_path / "nothing", f"sqlite:///{tmp_path}/nothing/actdb.sqlite", "serve", "--port", 0)
    assert r.exit_code == 1 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr


# --- in a real browser: Playwright for Python driving Debian's chromium ---

CHROMIUM = "/usr/bin/chromium"


@pytest.fixture(scope="module")
def server_url(served_store):
    """The explorer served by uvicorn on a free port of 127.0.0.1, in a thread of this process."""
    import socket
    import threading
    import time

    import uvicorn

    from actdb.query.serve.app import create_app

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(
        uvicorn.Config(create_app(served_store[0], device="cpu"), host="127.0.0.1", port=port, log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    for _ in range(200):
        if server.started:
            break
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(10)


@pytest.fixture(scope="module")
def browser():
    """Chromium through Playwright; missing either is a skip here, a failure where ACTDB_REQUIRE_BROWSER is set
    (CI installs chromium first)."""
    import os

    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        sync_playwright = None
    if sync_playwright is None or not os.path.exists(CHROMIUM):
        missing = "playwright" if sync_playwright is None else CHROMIUM
        if os.environ.get("ACTDB_REQUIRE_BROWSER"):
            pytest.fail(f"{missing} is missing and ACTDB_REQUIRE_BROWSER is set")
        pytest.skip(f"{missing} is missing (apt-get install chromium; pip install playwright)")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield b
        b.close()


def test_in_chromium_from_home_to_a_twin_an_earlier_step_a_token_and_a_sql_download(
    browser, server_url, served_store, tmp_path
):
    page = browser.new_page()
    problems: list[str] = []
    page.on("console", lambda m: problems.append(m.text) if m.type in ("error", "warning") else None)
    page.on("pageerror", lambda e: problems.append(str(e)))
    page.goto(server_url + "/")
    assert "Universality share" in page.inner_text("main")
    page.click("nav >> text=Universal neurons")
    page.select_option("select[name=model]", "a")
    page.fill("input[name=step]", "1")
    page.click("form.filters button")
    first = page.locator("main table tbody tr td a").first
    cell = first.inner_text()  # model a, step 1: the neuron's first cell is its model
    first.click()
    page.wait_for_url("**/neuron/a@1/**")
    layer_neuron = page.url.rsplit("/", 1)[1]
    page.locator("section[aria-labelledby=twins-h] table a").first.click()
    page.wait_for_url("**/neuron/b@1/**")
    twin = page.url.rsplit("/", 1)[1]
    page.go_back()
    page.click("section[aria-labelledby=steps-h] ul a:text('step 0')")
    page.wait_for_url(f"**/neuron/a@0/{layer_neuron}")
    assert cell == "a" and twin
    token = _a_top_token(served_store[0])
    page.click("nav >> text=Token search")
    page.fill("#token", token)
    page.keyboard.press("Enter")
    page.wait_for_url("**/search?token=*")
    assert page.locator("main table tbody tr").count() > 0
    page.click("nav >> text=SQL")
    page.fill("#q", "SELECT '<script>alert(1)</script> & \"q\"' AS x, name FROM model ORDER BY name")
    page.click("main form button")
    page.wait_for_url("**/sql?q=*")
    assert page.locator("main table tbody td").first.inner_text() == '<script>alert(1)</script> & "q"'
    assert page.locator("main script").count() == 0
    with page.expect_download() as download:
        page.click("main a:text-is('CSV')")
    saved = tmp_path / "sql.csv"
    download.value.save_as(saved)
    assert saved.read_text().splitlines()[1:] == [
        '"<script>alert(1)</script> & ""q""",a',
        '"<script>alert(1)</script> & ""q""",b',
    ]
    assert problems == []
    page.close()


def test_in_chromium_chart_lines_are_strokes_not_filled_shapes(browser, server_url):
    """A line of three or more points is a polyline; its series colour must stroke it, not fill the polygon it
    encloses (a class rule for the colour once overrode the line's `fill: none`)."""
    page = browser.new_page()
    page.goto(server_url + "/persistence")
    lines = page.locator("svg polyline.line")
    assert lines.count() > 0
    for k in range(lines.count()):
        style = lines.nth(k).evaluate("e => [getComputedStyle(e).fill, getComputedStyle(e).stroke]")
        assert style[0] == "none" and style[1] != "none", style
    page.close()


def test_in_chromium_tables_are_keyboard_navigable(browser, server_url):
    page = browser.new_page()
    page.goto(server_url + "/universal?sort=excess")
    for _ in range(60):  # Tab through the page until a link inside the table has the focus
        page.keyboard.press("Tab")
        if page.evaluate("document.activeElement.closest('table') !== null && document.activeElement.tagName === 'A'"):
            break
    else:
        pytest.fail("no table link took the keyboard focus")
    target = page.evaluate("document.activeElement.getAttribute('href')")
    page.keyboard.press("Enter")
    page.wait_for_url("**" + target)
    assert page.locator("h1").inner_text().startswith(target.split("/")[2].replace("%40", "@"))
    page.close()


def test_api_text_activations_equal_the_cli_and_the_browse_command(served_store, tmp_path, monkeypatch):
    from actdb.query.api import ActdbStore
    from actdb.query.serve.launch import browse_command

    config, _sources = served_store
    db = ActdbStore.open(config.home, config.database_url)
    try:
        got = db.text_activations("a@0", "def f(x):", ["1.5", "0.2"], device="cpu")
    finally:
        db.close()
    run = cli_runner(config.home, config.database_url)
    out = run("activations", "a@0", "--text", "def f(x):", "--neurons", "1.5,0.2", "--format", "csv").stdout
    rows = list(csv.DictReader(io.StringIO(out)))
    assert list(got.columns) == ["position", "token", "a@0 1.5", "a@0 0.2"] and len(got) == len(rows)
    np.testing.assert_allclose(got["a@0 1.5"].to_numpy(), [float(r["a@0 1.5"]) for r in rows], rtol=1e-3, atol=1e-4)
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")  # an active venv
    assert browse_command(config) == f"actdb --home {config.home} serve"
    pg = StoreConfig.resolve(tmp_path, "postgresql://u:secret@127.0.0.1/x")
    assert browse_command(pg).endswith("serve") and "secret" not in browse_command(pg) and "--db" in browse_command(pg)


def test_the_browse_command_runs_as_printed_in_a_shell_without_the_venv(served_store, monkeypatch):
    """`scripts/bootstrap.sh` never activates `.venv`: the demo's last line then names the venv's script."""
    from actdb.query.serve.launch import browse_command

    config, _sources = served_store
    bare = "/usr/local/bin:/usr/bin:/bin"
    monkeypatch.setenv("PATH", bare)
    venv = Path(sys.executable).parent
    monkeypatch.chdir(venv.parent.parent)  # the repository root, where bootstrap made .venv
    printed = browse_command(config)
    assert printed.startswith(f"{Path(venv.parent.name, venv.name, 'actdb')} --home {config.home} ")  # .venv/bin/
    shell = subprocess.run(["bash", "-c", f"{printed} --help"], env={"PATH": bare}, capture_output=True, text=True)
    assert shell.returncode == 0 and "Usage: actdb serve" in shell.stdout, shell.stderr  # no "command not found"
    monkeypatch.chdir(config.home)  # elsewhere: the script's absolute path
    assert browse_command(config).startswith(f"{venv / 'actdb'} --home ")


def test_cached_pages_are_read_again_once_the_store_changes(store):
    from sqlalchemy import insert

    from actdb.query.serve.app import templates
    from actdb.query.serve.site import Site, generation
    from actdb.query.text_activations import LoadedModels
    from actdb.store.database import tables

    site = Site(store, templates(), LoadedModels(1, "cpu"))
    reads = []
    assert site.cached("k", lambda: reads.append(1) or len(reads)) == 1
    assert site.cached("k", lambda: reads.append(1) or len(reads)) == 1  # same generation: not read again
    before = generation(store)
    with store.transaction() as conn:
        conn.execute(
            insert(tables.model).values(name="m", family="gpt2", architecture="gpt2", n_layers=1, d_mlp=4, source="x")
        )
    assert generation(store) != before
    assert site.cached("k", lambda: reads.append(1) or len(reads)) == 2


def test_an_empty_store_on_sqlite_and_postgresql_is_served_read_only(db_url, tmp_path):
    from sqlalchemy import insert
    from starlette.testclient import TestClient

    from actdb.query.serve.app import create_app
    from actdb.store.database import tables

    run = cli_runner(tmp_path / "home", db_url)
    run("init")
    sqlite_file = Path(db_url.removeprefix("sqlite:///"))
    before = sqlite_file.read_bytes() if db_url.startswith("sqlite") else None
    app = create_app(StoreConfig.resolve(tmp_path / "home", db_url), device="cpu")
    with TestClient(app, raise_server_exceptions=False) as client:
        assert client.get("/").status_code == 200
        assert "0 neurons" in client.get("/universal").text
        assert client.get("/sql", params={"q": "SELECT 1 AS one"}).status_code == 200
        refused = client.get("/sql", params={"q": "INSERT INTO dataset (name) VALUES ('x')"})
        assert refused.status_code == 400 and 'class="error"' in refused.text
        assert client.get("/neuron/m@0/0.0").status_code == 404
    if before is not None:
        assert sqlite_file.read_bytes() == before  # browsing wrote nothing
    store = app.state.site.store
    assert store.read_only
    with pytest.raises(Exception, match="(?i)read.?only|readonly"), store.transaction() as conn:
        conn.execute(
            insert(tables.model).values(name="m", family="f", architecture="a", n_layers=1, d_mlp=1, source="s")
        )
    store.close()


def test_token_search_finds_exactly_the_neurons_whose_top_token_it_is(client, served_store):
    from actdb.query.explanations import explained_neurons
    from actdb.store.database.connection import Store

    token = _a_top_token(served_store[0])
    store = Store.open(served_store[0], read_only=True)
    try:
        expected = {
            (r["model"], r["step"], r["layer"], r["neuron"])
            for r in explained_neurons(store)
            if r["token"] and r["token"][1:-1].strip().lower() == token.strip().lower()
        }
    finally:
        store.close()
    rows = list(csv.DictReader(io.StringIO(client.get("/search", params={"token": token, "format": "csv"}).text)))
    fires = {(r["model"], int(r["step"]), int(r["layer"]), int(r["neuron"])) for r in rows if r["how"] == "fires on"}
    assert fires == expected and len(expected) < 200
    assert all(r["token"].strip().lower() == token.strip().lower() for r in rows)


def test_serve_warns_when_it_listens_beyond_this_machine(tmp_path):
    import socket

    run = cli_runner(tmp_path / "home", f"sqlite:///{tmp_path}/home/actdb.sqlite")
    run("init")
    with socket.socket() as busy:  # the port is taken, so the server stops right after the warning
        busy.bind(("0.0.0.0", 0))
        busy.listen()
        port = busy.getsockname()[1]
        r = subprocess.run(  # its own process: uvicorn runs an event loop, as the real command does
            [Path(sys.executable).with_name("actdb"), "--home", tmp_path / "home", "serve", "--host", "0.0.0.0"]
            + ["--port", str(port)],
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert r.returncode != 0
    assert "warning: listening on 0.0.0.0: anyone who can reach this address can read the whole store" in r.stderr

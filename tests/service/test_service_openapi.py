"""The API describes itself: the OpenAPI document declares how to authenticate and what errors
come back, and /docs and /redoc work with no network (every file they load is served here)."""
from __future__ import annotations

import re
from html.parser import HTMLParser
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service_testlib import auth

pytestmark = pytest.mark.integration

NO_KEY = {"bearer", "apiKey"}


@pytest.fixture(scope="module")
def api(make_env):
    """The real app with API keys configured (Redis job store); no worker is needed here."""
    with TestClient(create_app(make_env().settings())) as c:
        yield c


@pytest.fixture(scope="module")
def spec(api):
    return api.get("/openapi.json").json()


def _operations(spec):
    for path, ops in spec["paths"].items():
        for method, op in ops.items():
            yield path, method, op


def test_the_schema_declares_the_api_key_schemes(spec):
    schemes = spec["components"]["securitySchemes"]
    assert schemes["bearer"] == {"type": "http", "scheme": "bearer", "description": schemes["bearer"]["description"]}
    assert schemes["apiKey"]["type"] == "apiKey" and schemes["apiKey"]["in"] == "header"
    assert schemes["apiKey"]["name"] == "X-API-Key"


def test_every_keyed_operation_declares_its_security_and_its_401_and_429(spec):
    keyed = 0
    for path, method, op in _operations(spec):
        codes = set(op["responses"])
        assert {"500", "503"} <= codes, (method, path)  # every route can meet a bug or a store outage
        if path in ("/healthz", "/readyz"):
            assert "security" not in op and "401" not in codes, path
            continue
        keyed += 1
        assert op["security"] == [{"bearer": []}, {"apiKey": []}], (method, path)  # either one
        assert "WWW-Authenticate" in op["responses"]["401"]["headers"], (method, path)
        assert "Retry-After" in op["responses"]["429"]["headers"], (method, path)
        for code in ("401", "429"):
            ref = op["responses"][code]["content"]["application/json"]["schema"]["$ref"]
            assert ref.endswith("/ErrorPublic"), (method, path, code)
    assert keyed >= 15


def test_what_the_schema_says_about_keys_is_what_the_api_does(api, spec):
    """Each operation declared as keyed answers 401 (with WWW-Authenticate) to a call without a
    key, and to one with a wrong key; the unkeyed ones do not ask for one."""
    for path, method, op in _operations(spec):
        url = re.sub(r"\{[^}]+\}", "x", path)
        r = api.request(method.upper(), url, headers={"Authorization": ""})
        if "security" in op:
            assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Bearer"), (method, path)
            r = api.request(method.upper(), url, headers={"Authorization": "Bearer not-a-key"})
            assert r.status_code == 401 and r.json()["detail"] == "invalid API key", (method, path)
            r = api.request(method.upper(), url, headers={"Authorization": "", "X-API-Key": "not-a-key"})
            assert r.status_code == 401, (method, path)
        else:
            assert r.status_code != 401, (method, path)
    assert api.get("/jobs", headers={"Authorization": "", "X-API-Key": auth()["Authorization"][7:]}).status_code == 200


class _Assets(HTMLParser):
    """Every URL an HTML page loads by itself: <script src>, <link href>, <img src>, ReDoc's spec-url."""

    def __init__(self):
        super().__init__()
        self.urls: list[str] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        for key in ("src", "href", "spec-url"):
            if a.get(key):
                self.urls.append(a[key])


@pytest.mark.parametrize("page,script", [("/docs", "swagger-ui-bundle.js"), ("/redoc", "redoc.standalone.js")])
def test_the_docs_pages_load_nothing_from_another_host(api, page, script):
    """What the browser fetches for /docs is all served by the API itself (the page was blank
    offline when it came from a CDN): no absolute URL on the page, every asset answered here,
    in full, with its type; Swagger UI's online validator badge is off."""
    r = api.get(page)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert "http://" not in r.text and "https://" not in r.text
    p = _Assets()
    p.feed(r.text)
    urls = p.urls + re.findall(r"url: '([^']+)'", r.text)  # Swagger UI's spec URL, in its script
    assert any(u.endswith(script) for u in urls) and "/openapi.json" in urls
    static = Path(__file__).resolve().parents[2] / "service" / "static"
    types = {".js": "text/javascript", ".css": "text/css", ".png": "image/png", ".json": "application/json"}
    for u in urls:
        assert u.startswith("/") and not u.startswith("//"), u
        got = api.get(u)
        assert got.status_code == 200, u
        assert got.headers["content-type"].startswith(types[Path(u).suffix]), u
        if u.startswith("/static/"):
            assert got.content == (static / u[len("/static/"):]).read_bytes(), u
    if page == "/docs":
        assert '"validatorUrl": null' in r.text


def test_the_vendored_docs_files_carry_their_licences():
    root = Path(__file__).resolve().parents[2] / "service" / "static" / "docs"
    notice = (root / "NOTICE.md").read_text()
    for folder, licence in (("swagger-ui", "Apache License"), ("redoc", "MIT License")):
        assert licence in (root / folder / "LICENSE").read_text()
        for f in (root / folder).iterdir():
            assert f.name in notice or f.name.endswith(".LICENSE.txt") or f.name in ("LICENSE", "NOTICE"), f
    assert "5.36.0" in notice and "2.5.4" in notice

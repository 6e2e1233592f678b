"""The gateway describing itself: ``/openapi.json`` is a valid OpenAPI 3.1 document of the
cluster's actions that a live gateway honours (schemathesis fuzzes it), and the gateway's page
shows the cluster and its live events in a real headless Chromium.

The gateway is a real ``nerve gateway`` process hosting this module's services; its HTTP API
is used over loopback. Chromium comes from ci/setup.sh (Debian's ``chromium`` package).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import httpx
import hypothesis
import hypothesis.errors
import jsonschema_rs
import msgspec
import pytest
import schemathesis
from httpx_ws import WebSocketSession, connect_ws

import nerve
from nerve.errors import ValidationError
from nerve.gateway.openapi import document

TESTS = Path(__file__).parent


# --- the cluster: services with typed and untyped actions -------------------------------------

class Address(msgspec.Struct):
    street: str
    city: str
    postcode: str | None = None


class Line(msgspec.Struct):
    sku: Annotated[str, msgspec.Meta(min_length=1, max_length=40)]
    quantity: Annotated[int, msgspec.Meta(ge=1, le=1000)]


class Order(msgspec.Struct):
    customer: str
    ship_to: Address
    lines: list[Line]
    gift: bool = False


#: another struct called Address, of another shape: the document must keep both
Contact = msgspec.defstruct("Address", [("email", str), ("phone", str | None, None)])


class Lookup(msgspec.Struct):
    who: Contact  # type: ignore[valid-type]
    limit: int = 10


class Shop(nerve.Service):
    name = "shop"

    @nerve.action
    async def order(self, ctx: nerve.Context, params: Order) -> dict[str, Any]:
        return {"customer": params.customer, "city": params.ship_to.city,
                "items": sum(line.quantity for line in params.lines)}

    @nerve.action
    async def echo(self, ctx: nerve.Context) -> Any:
        return ctx.params

    @nerve.action
    async def refuse(self, ctx: nerve.Context) -> None:
        raise ValidationError("shop.refuse refuses everything", data={"field": None})

    @nerve.action
    async def fail(self, ctx: nerve.Context) -> None:
        raise RuntimeError("shop.fail always fails")

    @nerve.event("shop.*")
    async def seen(self, ctx: nerve.Context) -> None:
        pass


class Crm(nerve.Service):
    name = "crm"
    version = 2

    @nerve.action
    async def lookup(self, ctx: nerve.Context, params: Lookup) -> dict[str, Any]:
        return {"email": params.who.email, "limit": params.limit}


#: calls that fail on purpose, and how
DELIBERATE = {"/v1/call/shop.fail": {500}, "/v1/call/shop.refuse": {422}}


class Gateway:
    """A ``nerve gateway`` process: ``url``, ``node_id``."""

    def __init__(self) -> None:
        exe = shutil.which("nerve", path=os.path.dirname(sys.executable)) or "nerve"
        self.log = tempfile.TemporaryFile(mode="w+")  # a pipe nobody reads would fill and block it
        self.proc = subprocess.Popen(
            [exe, "gateway", "--http", "127.0.0.1:0", "--node-id", f"gw-{secrets.token_hex(3)}",
             "--service", f"{__name__.rpartition('.')[2]}:Shop",
             "--service", f"{__name__.rpartition('.')[2]}:Crm"],
            cwd=TESTS, stdout=subprocess.PIPE, stderr=self.log, text=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait()
            self.log.seek(0)
            raise AssertionError(f"nerve gateway did not start:\n{self.log.read()}")
        shown = json.loads(line)
        self.url: str = shown["http"]
        self.node_id: str = shown["nodeID"]

    def close(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


@pytest.fixture(scope="module")
def gateway() -> Iterator[Gateway]:
    gw = Gateway()
    try:
        yield gw
    finally:
        gw.close()


def get_document(gateway: Gateway) -> dict[str, Any]:
    reply = httpx.get(f"{gateway.url}/openapi.json", timeout=10)
    assert reply.status_code == 200, reply.text
    assert reply.headers["content-type"].startswith("application/json")
    return reply.json()  # type: ignore[no-any-return]


# --- the document --------------------------------------------------------------------------------

def resolve(doc: dict[str, Any], ref: str) -> Any:
    assert ref.startswith("#/"), ref
    node: Any = doc
    for part in ref[2:].split("/"):
        node = node[part.replace("~1", "/").replace("~0", "~")]
    return node


def walk(value: Any) -> Iterator[dict[str, Any]]:
    if isinstance(value, dict):
        yield value
        for v in value.values():
            yield from walk(v)
    elif isinstance(value, list):
        for v in value:
            yield from walk(v)


def check_openapi_31(doc: dict[str, Any]) -> None:
    """``doc`` is valid against the OpenAPI 3.1 schema (as schemathesis ships it), its schemas
    are valid JSON Schema 2020-12, and every reference resolves inside it."""
    assert doc["openapi"].startswith("3.1.")
    schemathesis.openapi.from_dict(doc).validate()
    for name, schema in doc["components"]["schemas"].items():
        assert jsonschema_rs.meta.is_valid(schema), name
    for node in walk(doc):
        ref = node.get("$ref")
        if isinstance(ref, str):
            resolve(doc, ref)
    ids = [op["operationId"] for item in doc["paths"].values() for op in item.values()]
    assert len(ids) == len(set(ids))


def test_document_is_openapi_31_with_the_clusters_actions(gateway: Gateway) -> None:
    doc = get_document(gateway)
    check_openapi_31(doc)
    paths = doc["paths"]
    for action in ("shop.order", "shop.echo", "shop.refuse", "v2.crm.lookup", "$node.actions"):
        assert f"/v1/call/{action}" in paths, sorted(paths)
    for route in ("/v1/emit/{event}", "/v1/broadcast/{event}", "/v1/registry/nodes", "/v1/registry/services",
                  "/v1/registry/services/{name}", "/v1/registry/actions", "/v1/registry/events", "/v1/events"):
        assert route in paths
    assert set(paths["/v1/registry/services"]) == {"get", "post"}
    assert "text/event-stream" in paths["/v1/events"]["get"]["responses"]["200"]["content"]

    def body(action: str) -> dict[str, Any]:
        schema = paths[f"/v1/call/{action}"]["post"]["requestBody"]["content"]["application/json"]["schema"]
        assert {"params", "meta", "options"} <= set(schema["properties"])
        return schema  # type: ignore[no-any-return]

    # a typed action: its params are the struct's schema, nested structs in components
    order = resolve(doc, body("shop.order")["properties"]["params"]["$ref"])
    assert order["required"] == ["customer", "ship_to", "lines"]
    address = resolve(doc, order["properties"]["ship_to"]["$ref"])
    assert set(address["properties"]) == {"street", "city", "postcode"}
    lines = order["properties"]["lines"]
    assert lines["type"] == "array"
    line = resolve(doc, lines["items"]["$ref"])
    assert line["properties"]["quantity"] == {"type": "integer", "minimum": 1, "maximum": 1000}
    # the other Address keeps its own shape under another name
    lookup = resolve(doc, body("v2.crm.lookup")["properties"]["params"]["$ref"])
    contact_ref = lookup["properties"]["who"]["$ref"]
    assert contact_ref != order["properties"]["ship_to"]["$ref"]
    assert set(resolve(doc, contact_ref)["properties"]) == {"email", "phone"}
    # an untyped action takes any object
    assert body("shop.echo")["properties"]["params"]["type"] == "object"
    # answers and errors
    responses = paths["/v1/call/shop.order"]["post"]["responses"]
    assert resolve(doc, responses["200"]["content"]["application/json"]["schema"]["$ref"])["required"] == [
        "response", "meta"]
    assert {"404", "422", "504", "default"} <= set(responses)


def test_document_from_other_nodes_definitions() -> None:
    """Params that are not a JSON Schema (a moleculer.js node's fastest-validator rules) are
    kept aside; odd action names still make paths; clashing struct names get their own."""
    order = msgspec.json.schema(Order)
    same_name_other_shape = msgspec.json.schema(Lookup)
    actions = [
        {"name": "js.greet", "action": {"name": "js.greet", "params": {"name": "string", "type": "string|optional"}}},
        {"name": "odd/name {x}", "action": {"name": "odd/name {x}"}},
        {"name": "a.b", "action": {"name": "a.b", "params": order}},
        {"name": "c.d", "action": {"name": "c.d", "params": order}},
        {"name": "e.f", "action": {"name": "e.f", "params": same_name_other_shape}},
        {"name": "g.h", "action": {"name": "g.h", "params": {"$ref": "#/$defs/Missing"}}},
    ]
    doc = document(actions, prefix="/api", version="1")
    check_openapi_31(doc)
    greet = doc["paths"]["/api/call/js.greet"]["post"]
    assert greet["x-moleculer-params"] == {"name": "string", "type": "string|optional"}
    schema = greet["requestBody"]["content"]["application/json"]["schema"]["properties"]["params"]
    assert schema["type"] == "object" and "$ref" not in schema
    assert "/api/call/odd%2Fname%20%7Bx%7D" in doc["paths"]
    params = [doc["paths"][f"/api/call/{a}"]["post"]["requestBody"]["content"]["application/json"]["schema"]
              ["properties"]["params"] for a in ("a.b", "c.d", "g.h")]
    assert params[0] == params[1] == {"$ref": "#/components/schemas/Order"}  # the same struct: shared
    assert params[2]["type"] == "object"  # a dangling reference: not taken as a schema
    schemas = doc["components"]["schemas"]
    assert {"Order", "Address", "Line", "Lookup"} <= set(schemas)
    assert "e.f.Address" in schemas and set(schemas["e.f.Address"]["properties"]) == {"email", "phone"}


# --- the page, in a real headless Chromium ---------------------------------------------------------

class Chromium:
    """A headless Chromium with one page, driven over the DevTools protocol."""

    def __init__(self) -> None:
        exe = shutil.which("chromium")
        if exe is None:
            pytest.fail("Chromium is not installed (no 'chromium' on PATH): run ci/setup.sh, which installs "
                        "Debian's chromium package, then run the tests again", pytrace=False)
        self.profile = tempfile.TemporaryDirectory(prefix="nerve-chromium-", ignore_cleanup_errors=True)
        self.proc = subprocess.Popen(
            [exe, "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run", "--no-default-browser-check",
             "--disable-extensions", "--disable-background-networking", "--disable-sync",
             "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0",
             f"--user-data-dir={self.profile.name}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        port_file = Path(self.profile.name) / "DevToolsActivePort"
        deadline = time.monotonic() + 30
        while not (port_file.exists() and port_file.read_text().count("\n") >= 1):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.close()
                raise AssertionError(f"chromium did not start its DevTools endpoint ({exe})")
            time.sleep(0.05)
        port = int(port_file.read_text().split()[0])
        targets = httpx.get(f"http://127.0.0.1:{port}/json/list", timeout=10).json()
        page = next(t for t in targets if t["type"] == "page")
        self.http = httpx.Client(timeout=10)
        self._ws_context = connect_ws(page["webSocketDebuggerUrl"], self.http, max_message_size_bytes=1 << 24)
        self.ws: WebSocketSession = self._ws_context.__enter__()
        self.last_id = 0

    def send(self, method: str, **params: Any) -> dict[str, Any]:
        self.last_id += 1
        self.ws.send_json({"id": self.last_id, "method": method, "params": params})
        while True:
            message = self.ws.receive_json(timeout=30)
            if message.get("id") == self.last_id:
                if "error" in message:
                    raise AssertionError(f"{method}: {message['error']}")
                return message["result"]  # type: ignore[no-any-return]

    def evaluate(self, expression: str) -> Any:
        result = self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise AssertionError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 20) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            value = self.evaluate(expression)
            if value:
                return value
            if time.monotonic() > deadline:
                text = self.evaluate("document.body ? document.body.innerText : ''")
                raise AssertionError(f"timed out waiting for {expression}; the page shows:\n{text}")
            time.sleep(0.1)

    def open(self, url: str) -> None:
        self.send("Page.navigate", url=url)
        self.wait_for(f"location.href === {json.dumps(url)} && document.readyState === 'complete'")

    def close(self) -> None:
        if hasattr(self, "ws"):
            try:
                self.send("Browser.close")
            except Exception:  # it went away first: terminated below all the same
                pass
            self._ws_context.__exit__(None, None, None)
            self.http.close()
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.profile.cleanup()


@pytest.fixture(scope="module")
def chromium() -> Iterator[Chromium]:
    browser = Chromium()
    try:
        yield browser
    finally:
        browser.close()


def text_of(browser: Chromium, element_id: str) -> str:
    return str(browser.evaluate(f"document.getElementById({json.dumps(element_id)}).innerText"))


def test_page_files_are_served_with_their_types_and_nothing_else(gateway: Gateway) -> None:
    expected = {"/": "text/html", "/index.html": "text/html", "/static/app.js": "text/javascript",
                "/static/app.css": "text/css"}
    with httpx.Client(base_url=gateway.url, timeout=10) as client:
        for path, ctype in expected.items():
            reply = client.get(path)
            assert reply.status_code == 200, path
            assert reply.headers["content-type"].split(";")[0] == ctype
            assert reply.headers["x-content-type-options"] == "nosniff"
            assert "http://" not in reply.text and "https://" not in reply.text  # nothing from elsewhere
        for path in ("/static/", "/static/index.html", "/static/../openapi.py", "/static/%2e%2e/openapi.py",
                     "/static/app.js/", "/app.js"):
            assert client.get(path).status_code == 404, path
        page = client.get("/").text
    assert '<meta name="nerve-prefix" content="/v1">' in page


def test_page_shows_the_cluster_and_calls_an_action(gateway: Gateway, chromium: Chromium) -> None:
    page = httpx.get(gateway.url + "/", timeout=10).text
    for name in ("shop.order", "v2.crm", gateway.node_id):
        assert name not in page  # so what the browser shows, the page's script fetched
    chromium.open(gateway.url + "/")
    chromium.wait_for("document.body.dataset.registry === 'loaded'")
    actions = text_of(chromium, "actions")
    for name in ("shop.order", "shop.echo", "v2.crm.lookup", "$node.actions"):
        assert name in actions
    assert "shop" in text_of(chromium, "services") and "v2.crm" in text_of(chromium, "services")
    assert gateway.node_id in text_of(chromium, "nodes")

    params = {"customer": "ada", "ship_to": {"street": "1 Loop", "city": "Lyon"},
              "lines": [{"sku": "a", "quantity": 2}, {"sku": "b", "quantity": 3}]}
    chromium.evaluate(f"""
        document.getElementById('call-action').value = 'shop.order';
        document.getElementById('call-params').value = {json.dumps(json.dumps(params))};
        document.querySelector('#call-form button[type=submit]').click();
    """)
    chromium.wait_for("document.getElementById('call-status').dataset.status === '200'")
    assert json.loads(text_of(chromium, "call-answer"))["response"] == {"customer": "ada", "city": "Lyon", "items": 5}

    chromium.evaluate("""
        document.getElementById('call-action').value = 'shop.order';
        document.getElementById('call-params').value = '{"customer": "ada"}';
        document.querySelector('#call-form button[type=submit]').click();
    """)
    chromium.wait_for("document.getElementById('call-status').dataset.status === '422'")
    assert json.loads(text_of(chromium, "call-answer"))["error"]["name"] == "ValidationError"


def test_page_shows_live_events(gateway: Gateway, chromium: Chromium) -> None:
    chromium.open(gateway.url + "/index.html")
    chromium.wait_for("document.getElementById('events-state').dataset.state === 'open'")
    parcel = f"parcel-{secrets.token_hex(4)}"
    assert parcel not in text_of(chromium, "events")
    reply = httpx.post(f"{gateway.url}/v1/emit/shop.shipped", json={"params": {"parcel": parcel}}, timeout=10)
    assert reply.status_code == 200, reply.text
    chromium.wait_for(f"document.getElementById('events').innerText.includes({json.dumps(parcel)})")
    shown = text_of(chromium, "events")
    assert "shop.shipped" in shown and gateway.node_id in shown


# --- schemathesis: the live gateway honours its document ----------------------------------------

def test_a_failing_handler_answers_with_an_error_body(gateway: Gateway) -> None:
    """A handler's own exception (not a NerveError) is a 500 with an error body, as documented
    (schemathesis found it answered as Starlette's bare text/plain "Internal Server Error")."""
    reply = httpx.post(f"{gateway.url}/v1/call/shop.fail", json={}, timeout=10)
    assert reply.status_code == 500
    assert reply.headers["content-type"].startswith("application/json"), reply.text
    assert reply.json()["error"]["code"] == 500


def not_a_server_error_unless_documented(ctx: Any, response: Any, case: Any) -> None:
    """No 5xx, except a 504 for a call given a tiny timeout and the 500 of an action that fails."""
    status = response.status_code
    allowed = set(DELIBERATE.get(case.operation.path, ()))
    if case.operation.path.startswith("/v1/call/"):
        allowed.add(504)
    if status >= 500 and status not in allowed:
        raise AssertionError(f"{case.operation.label} answered {status}: {response.text[:500]}")


#: what a valid request (schemathesis' positive mode) may be answered with, by operation
ACCEPTED = {"POST /v1/registry/services": {200, 409},  # 409: the name of one of the node's own services
            "DELETE /v1/registry/services/{name}": {200, 404}}  # 404: no such external service


def accepts_valid_requests(ctx: Any, response: Any, case: Any) -> None:
    """A request the document says is valid (schemathesis' positive mode) is not refused; a
    call may still time out, or fail as its action does on purpose."""
    label = case.operation.label
    accepted = ACCEPTED.get(label, {200}) | DELIBERATE.get(case.operation.path, set())
    if case.operation.path.startswith("/v1/call/"):
        accepted.add(504)
    if response.status_code in accepted:
        return
    raise AssertionError(f"{label} refused a valid request with {response.status_code}: {response.text[:500]}")


def test_retries_may_be_an_integral_float(gateway: Gateway) -> None:
    body = b'{"params": {"a": 1}, "options": {"retries": 2.0}}'  # 2.0 as JSON, not 2
    reply = httpx.post(f"{gateway.url}/v1/call/shop.echo", content=body,
                       headers={"content-type": "application/json"}, timeout=10)
    assert reply.status_code == 200, reply.text


def test_gateway_honours_its_document(gateway: Gateway) -> None:
    """Every operation of the document (but the never-ending live events), fuzzed with valid
    and invalid requests: no undocumented server error, answers as documented. (Run through
    Hypothesis directly: schemathesis' lazy pytest fixture does not work with pytest 9.)"""
    schema = schemathesis.openapi.from_url(f"{gateway.url}/openapi.json", timeout=10)
    schema.validate()
    examples = int(os.environ.get("NERVE_FUZZ_EXAMPLES", "40"))  # per operation and mode
    checks = [not_a_server_error_unless_documented, schemathesis.checks.response_schema_conformance,
              schemathesis.checks.status_code_conformance, schemathesis.checks.content_type_conformance]
    failures: list[str] = []
    tested: list[str] = []
    for result in schema.get_all_operations():
        operation = result.ok()
        if operation.path == "/v1/events":
            continue
        tested.append(operation.label)
        for mode in (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE):

            @hypothesis.settings(max_examples=examples, deadline=None, database=None, derandomize=True,
                                 suppress_health_check=list(hypothesis.HealthCheck),
                                 phases=[hypothesis.Phase.generate, hypothesis.Phase.shrink])
            @hypothesis.given(case=operation.as_strategy(generation_mode=mode))
            def fuzz(case: Any) -> None:
                extra = [accepts_valid_requests] if mode == schemathesis.GenerationMode.POSITIVE else []
                case.call_and_validate(timeout=10, checks=checks + extra)

            try:
                fuzz()
            except hypothesis.errors.Unsatisfiable:  # nothing of it can be made invalid
                pass
            except (Exception, BaseExceptionGroup) as exc:  # one report per operation and mode
                details = "\n".join(str(e) for e in getattr(exc, "exceptions", ()))
                failures.append(f"{operation.label} ({mode.value}): {exc}\n{details}")
    assert len(tested) >= 14, tested
    assert not failures, "\n\n".join(failures)


class AliasItem(msgspec.Struct):
    name: str


@pytest.mark.anyio
async def test_rest_aliases_are_operations_of_the_document() -> None:
    class Shop2(nerve.Service):
        name = "shop2"
        settings = {"rest": "/api"}

        @nerve.action(rest="GET /items/{id}")
        async def get(self, ctx: nerve.Context) -> dict[str, Any]:
            return {"id": ctx.params["id"]}

        @nerve.action(rest="POST /items")
        async def add(self, ctx: nerve.Context, item: AliasItem) -> str:
            return item.name

    async with nerve.Broker("oa", services=[Shop2()]) as broker, nerve.gateway.serve(broker, "127.0.0.1:0") as gw, \
            httpx.AsyncClient(base_url=gw.url) as http:
        doc = (await http.get("/openapi.json")).json()
    get = doc["paths"]["/api/items/{id}"]["get"]
    assert [p["name"] for p in get["parameters"]] == ["id"] and get["parameters"][0]["in"] == "path"
    post = doc["paths"]["/api/items"]["post"]
    body = post["requestBody"]["content"]["application/json"]["schema"]
    assert "$ref" in body or body.get("properties", {}).get("name")

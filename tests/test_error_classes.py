"""Error classes across the wire: the registry of wire names (an application's NerveError
subclass comes back as itself; nerve's and Moleculer's names stay theirs; a name is
peer-controlled text that only ever selects a registered class), the builtin bases (a
RequestTimeoutError is a TimeoutError...), BrokerNotRunningError and the docstrings."""

from __future__ import annotations

import gc
import inspect
import pickle
from typing import Any

import msgspec
import pytest
import trio

import nerve
from nerve import errors
from nerve.errors import (
    BrokerNotRunningError,
    BrokerOptionsError,
    ClientError,
    ForbiddenError,
    NerveError,
    QueueIsFullError,
    RemoteError,
    RequestTimeoutError,
    ServiceNotAvailableError,
    ServiceNotFoundError,
    StreamClosedError,
    ValidationError,
    error_from_wire,
    error_to_wire,
    registered_errors,
    request_timeout,
)

pytestmark = pytest.mark.anyio


# --- an application's classes ----------------------------------------------------------------


class InsufficientFunds(ClientError):
    """The account cannot cover the amount (its __init__ takes other arguments)."""

    default_code = 402
    default_type = "INSUFFICIENT_FUNDS"
    inits = 0

    def __init__(self, account: str, amount: int) -> None:
        type(self).inits += 1
        super().__init__(f"{account} cannot pay {amount}", data={"account": account, "amount": amount})
        self.account = account


class Renamed(NerveError):
    """Travels under a wire name of its own."""

    wire_name = "acme.Renamed"
    default_retryable = True


class Compatible(NerveError):
    """A class with NerveError's own signature."""

    default_code = 409


class PickyNew(NerveError):
    """A __new__ that needs an argument the wire does not carry."""

    def __new__(cls, token: str, *args: Any, **kw: Any) -> PickyNew:
        if not token:
            raise ValueError("no token")
        return super().__new__(cls)

    def __init__(self, token: str) -> None:
        super().__init__(f"token {token}")


class OrderInvalid(ValidationError):
    """Travels as its ancestor, Moleculer's ValidationError."""

    wire_name = "ValidationError"


class SlowToBuild(ValidationError):
    """A subclass of a nerve class under its own name."""


def through_the_wire(exc: BaseException) -> NerveError:
    return error_from_wire(msgspec.json.decode(msgspec.json.encode(error_to_wire(exc, node_id="n1"))))


class TestRegistry:
    def test_a_subclass_is_registered_under_its_class_name(self) -> None:
        assert registered_errors()["InsufficientFunds"] is InsufficientFunds
        assert registered_errors()["Compatible"] is Compatible
        assert registered_errors()["SlowToBuild"] is SlowToBuild
        assert Compatible("x").name == "Compatible"

    def test_or_under_its_wire_name(self) -> None:
        reg = registered_errors()
        assert reg["acme.Renamed"] is Renamed and "Renamed" not in reg
        assert Renamed("x").name == "acme.Renamed"

    def test_nerves_and_moleculers_names_map_to_nerves_classes(self) -> None:
        reg = registered_errors()
        for name in ("MoleculerError", "MoleculerRetryableError", "MoleculerServerError", "MoleculerClientError",
                     "ValidationError", "ServiceNotFoundError", "ServiceNotAvailableError", "RequestTimeoutError",
                     "RequestSkippedError", "RequestRejectedError", "QueueIsFullError", "MaxCallLevelError",
                     "GracefulStopTimeoutError", "ProtocolVersionMismatchError", "InvalidPacketDataError",
                     "ServiceSchemaError", "BrokerOptionsError", "BrokerDisconnectedError"):
            assert reg[name].__module__ == "nerve.errors", name
        assert reg["MoleculerError"] is NerveError
        assert reg["ValidationError"] is ValidationError
        assert reg["InvalidPacketDataError"] is errors.InvalidPacketDataError
        # RemoteError has no name of its own: it carries the sender's.
        assert "RemoteError" not in reg and RemoteError not in reg.values()

    def test_the_registry_is_a_copy(self) -> None:
        registered_errors()["Injected"] = Compatible
        assert "Injected" not in registered_errors()

    @pytest.mark.parametrize("cls", [InsufficientFunds, Renamed, Compatible, SlowToBuild],
                             ids=lambda c: c.__name__)
    def test_round_trip_keeps_the_class_and_every_field(self, cls: type[NerveError]) -> None:
        exc = InsufficientFunds("acct-1", 5) if cls is InsufficientFunds else cls("went wrong", data={"k": 1})
        back = through_the_wire(exc)
        assert type(back) is cls
        assert back.name == exc.name != "MoleculerError"
        assert (back.message, back.code, back.type, back.data, back.retryable) == \
            (exc.message, exc.code, exc.type, exc.data, exc.retryable)
        assert back.node_id == "n1" and type(exc).__name__ in (back.stack or "")
        assert str(back) == exc.message and back.args == (exc.message,)

    def test_a_class_whose_init_takes_other_arguments_is_rebuilt_without_calling_it(self) -> None:
        exc = InsufficientFunds("acct-1", 5)
        before = InsufficientFunds.inits
        back = through_the_wire(exc)
        assert InsufficientFunds.inits == before  # not called on the receiving side
        assert isinstance(back, InsufficientFunds) and isinstance(back, ClientError)
        assert back.data == {"account": "acct-1", "amount": 5} and back.code == 402
        assert not hasattr(back, "account")  # attributes of its own travel in data only

    def test_a_class_with_a_picky_new_is_rebuilt_too(self) -> None:
        with pytest.raises(ValueError):
            PickyNew("")
        back = through_the_wire(PickyNew("t"))
        assert type(back) is PickyNew and back.message == "token t"
        assert type(pickle.loads(pickle.dumps(PickyNew("t")))) is PickyNew

    def test_defaults_fill_a_bare_wire_form(self) -> None:
        back = error_from_wire({"name": "InsufficientFunds", "message": "m"})
        assert type(back) is InsufficientFunds
        assert (back.code, back.type, back.retryable) == (402, "INSUFFICIENT_FUNDS", False)
        assert error_from_wire({"name": "acme.Renamed"}).retryable is True

    def test_pickle_of_an_application_class(self) -> None:
        exc = InsufficientFunds("a", 1)
        back = pickle.loads(pickle.dumps(exc))
        assert type(back) is InsufficientFunds and back.__dict__ == exc.__dict__

    def test_a_subclass_may_travel_as_its_ancestor(self) -> None:
        assert OrderInvalid("bad").name == "ValidationError"
        assert registered_errors()["ValidationError"] is ValidationError
        assert "OrderInvalid" not in registered_errors()
        back = through_the_wire(OrderInvalid("bad", data={"field": "x"}))
        assert type(back) is ValidationError and back.data == {"field": "x"}

    def test_an_unknown_name_keeps_its_name(self) -> None:
        class Unknown(NerveError):
            """A class the receiving node does not have: its name is the sender's."""

            @property
            def name(self) -> str:
                return "acme.NotHere"

        back = through_the_wire(Unknown("gone", code=410, data=[1]))
        assert type(back) is RemoteError
        assert back.name == "acme.NotHere" and back.code == 410 and back.data == [1]
        assert error_to_wire(back)["name"] == "acme.NotHere"


class TestNameClaims:
    @pytest.mark.parametrize("name", ["ValidationError", "RequestTimeoutError", "MoleculerRetryableError",
                                      "MoleculerClientError", "InvalidPacketDataError", "StreamError"])
    def test_nerves_names_are_refused_to_another_class(self, name: str) -> None:
        with pytest.raises(TypeError, match=rf"wire name '{name}' is nerve's \(nerve\.errors\..*set wire_name"):
            type("Thief", (ClientError,) if name != "MoleculerClientError" else (errors.ServerError,),
                 {"wire_name": name})
        assert registered_errors()[name].__module__ == "nerve.errors"

    def test_moleculer_error_is_every_class_s_ancestor_s(self) -> None:
        class Plain(ClientError):
            """Travels as NerveError, as every class did before the registry."""

            wire_name = "MoleculerError"
        assert registered_errors()["MoleculerError"] is NerveError
        assert type(through_the_wire(Plain("x"))) is NerveError

    def test_a_class_named_like_one_of_nerves_is_refused(self) -> None:
        with pytest.raises(TypeError, match="'ServiceNotFoundError' is nerve's"):
            class ServiceNotFoundError(NerveError):
                pass
        assert registered_errors()["ServiceNotFoundError"] is errors.ServiceNotFoundError

    def test_a_subclass_of_the_same_name_travels_as_its_parent(self) -> None:
        class ServiceNotFoundError(errors.ServiceNotFoundError):
            pass
        assert ServiceNotFoundError("x").name == "ServiceNotFoundError"
        assert registered_errors()["ServiceNotFoundError"] is errors.ServiceNotFoundError

    def test_two_application_classes_sharing_a_name_keep_the_first_with_a_warning(
            self, caplog: pytest.LogCaptureFixture) -> None:
        """Two libraries may pick one name: no import-time crash; the first keeps it."""
        class Other(NerveError):
            wire_name = "acme.Renamed"
        assert registered_errors()["acme.Renamed"] is Renamed
        assert any("'acme.Renamed' is already" in r.getMessage() and "Renamed's" in r.getMessage()
                   for r in caplog.records if r.levelname == "WARNING")
        assert Other("x").name == "acme.Renamed"  # it still travels by its name
        assert type(error_from_wire(error_to_wire(Other("x"), "n"))) is Renamed

    def test_a_script_imported_again_as_a_module_is_the_same_class(self) -> None:
        main_cls = type("Twice", (NerveError,), {"__module__": "__main__", "__qualname__": "Twice"})
        again = type("Twice", (NerveError,), {"__module__": "server", "__qualname__": "Twice"})
        assert registered_errors()["Twice"] is again
        del main_cls

    def test_a_class_defined_again_replaces_itself(self) -> None:
        def define() -> type[NerveError]:
            class Redefined(NerveError):
                """Defined by a function called twice (as a reloaded module would)."""
            return Redefined

        first, second = define(), define()
        assert first is not second
        assert registered_errors()["Redefined"] is second
        assert type(error_from_wire({"name": "Redefined"})) is second

    def test_a_class_that_is_gone_frees_its_name(self) -> None:
        def define() -> None:
            class Ephemeral(NerveError):
                """Lives only in this function."""
            assert registered_errors()["Ephemeral"] is Ephemeral

        define()
        gc.collect()
        assert "Ephemeral" not in registered_errors()
        assert type(error_from_wire({"name": "Ephemeral"})) is RemoteError

        class Ephemeral(NerveError):  # the name is free again, for anyone
            """Another module's."""
        assert registered_errors()["Ephemeral"] is Ephemeral

    @pytest.mark.parametrize("bad", ["", 5, None])
    def test_a_wire_name_is_a_non_empty_string(self, bad: Any) -> None:
        with pytest.raises(TypeError, match="wire_name must be a non-empty str"):
            type("Bad", (NerveError,), {"wire_name": bad})


class TestHostileNames:
    @pytest.mark.parametrize("name", [
        "NerveError", "RemoteError", "Exception", "BaseException", "SystemExit", "KeyboardInterrupt",
        "TimeoutError", "ValueError", "object", "type", "__class__", "__init__", "__subclasses__",
        "builtins.eval", "os.system", "nerve.errors.NerveError", "nerve.errors.ValidationError",
        "InsufficientFunds.__init__", "x" * 10_000,
    ])
    def test_a_name_only_selects_a_registered_class(self, name: str) -> None:
        before = registered_errors()
        exc = error_from_wire({"name": name, "message": "m", "code": 500})
        assert type(exc) is RemoteError and exc.name == name
        assert registered_errors() == before

    def test_every_registered_class_is_a_nerve_error(self) -> None:
        assert registered_errors()
        assert all(isinstance(c, type) and issubclass(c, NerveError) for c in registered_errors().values())

    def test_a_registered_name_builds_that_class_only(self) -> None:
        for name, cls in registered_errors().items():
            exc = error_from_wire({"name": name, "message": "m", "data": {"x": 1}})
            assert type(exc) is cls and exc.message == "m" and exc.data == {"x": 1}


# --- over TCP, between two brokers -----------------------------------------------------------


class Bank(nerve.Service):
    name = "bank"

    @nerve.action
    async def pay(self, ctx: nerve.Context) -> None:
        raise InsufficientFunds("acct-9", 100)

    @nerve.action
    async def renamed(self, ctx: nerve.Context) -> None:
        raise Renamed("renamed", data={"r": 1})

    @nerve.action
    async def unknown(self, ctx: nerve.Context) -> None:
        class NotOnTheCaller(NerveError):
            @property
            def name(self) -> str:
                return "acme.NotOnTheCaller"
        raise NotOnTheCaller("gone", code=410)

    @nerve.action
    async def invalid(self, ctx: nerve.Context) -> None:
        raise OrderInvalid("bad order", data={"field": "qty"})

    @nerve.action
    async def slow(self, ctx: nerve.Context) -> str:
        await trio.sleep(5)
        return "late"

    @nerve.action
    async def fast(self, ctx: nerve.Context) -> str:
        return "ok"


async def test_error_classes_cross_a_tcp_connection() -> None:
    async with nerve.Broker("errcls-server", services=[Bank()], transport="tcp://127.0.0.1:0") as server, \
            nerve.Broker("errcls-client", transport="tcp://127.0.0.1:0", peers=[server.address]) as client:
        with trio.fail_after(10):
            await client.wait_for_services("bank")
        with pytest.raises(InsufficientFunds) as info:
            await client.call("bank.pay")
        exc = info.value
        assert type(exc) is InsufficientFunds and exc.name == "InsufficientFunds"
        assert (exc.code, exc.type, exc.data) == (402, "INSUFFICIENT_FUNDS", {"account": "acct-9", "amount": 100})
        assert exc.node_id == "errcls-server" and "InsufficientFunds" in (exc.stack or "")

        with pytest.raises(Renamed) as renamed:
            await client.call("bank.renamed")
        assert renamed.value.name == "acme.Renamed" and renamed.value.data == {"r": 1}

        with pytest.raises(RemoteError) as unknown:
            await client.call("bank.unknown")
        assert unknown.value.name == "acme.NotOnTheCaller" and unknown.value.code == 410

        with pytest.raises(ValueError) as invalid:  # travels as ValidationError, a ValueError
            await client.call("bank.invalid")
        assert type(invalid.value) is ValidationError and invalid.value.data == {"field": "qty"}

        # A call timeout is a TimeoutError, and the connection (whose tasks catch OSError)
        # is left alone: the next call goes over it.
        connections = client.transport.statistics()
        with pytest.raises(TimeoutError) as timeout:
            await client.call("bank.slow", timeout=0.2)
        assert type(timeout.value) is RequestTimeoutError
        assert await client.call("bank.fast") == "ok"
        assert "errcls-server" in client.transport.connected()
        assert client.transport.statistics() == connections or \
            _dials(client.transport.statistics()) == _dials(connections)


def _dials(stats: Any) -> Any:
    return getattr(stats, "dials", None), getattr(stats, "connections_opened", None)


# --- builtin bases ---------------------------------------------------------------------------


class TestBuiltinBases:
    @pytest.mark.parametrize(("cls", "builtin"), [
        (RequestTimeoutError, TimeoutError),
        (errors.RequestSkippedError, TimeoutError),
        (errors.StreamIdleTimeoutError, TimeoutError),
        (errors.GracefulStopTimeoutError, TimeoutError),
        (ValidationError, ValueError),
        (ForbiddenError, PermissionError),
        (ServiceNotFoundError, LookupError),
        (BrokerNotRunningError, RuntimeError),
    ], ids=lambda c: c.__name__)
    def test_subclasses_the_builtin(self, cls: type[NerveError], builtin: type[Exception]) -> None:
        assert issubclass(cls, builtin) and issubclass(cls, NerveError)
        exc = cls("went wrong", code=499, type="T", data={"d": 1}, retryable=True, node_id="n")
        with pytest.raises(builtin):
            raise exc
        assert str(exc) == "went wrong" and exc.args == ("went wrong",)
        assert (exc.message, exc.code, exc.type, exc.data, exc.retryable, exc.node_id) == \
            ("went wrong", 499, "T", {"d": 1}, True, "n")
        assert repr(exc) == f"{cls.__name__}('went wrong', code=499, type='T')"
        back = pickle.loads(pickle.dumps(exc))
        assert type(back) is cls and back.__dict__ == exc.__dict__ and back.args == exc.args
        wired = through_the_wire(exc)
        assert type(wired) is cls and isinstance(wired, builtin) and wired.args == ("went wrong",)

    def test_timeouts_are_oserrors_without_an_errno(self) -> None:
        exc = request_timeout("math.add", "node-1")
        assert isinstance(exc, OSError) and isinstance(exc, TimeoutError)
        assert (exc.errno, exc.strerror, exc.filename) == (None, None, None)
        assert str(exc) == "Request is timed out when call 'math.add' action on 'node-1' node."
        assert exc.code == 504 and exc.retryable is True

    @pytest.mark.parametrize("cls", [QueueIsFullError, StreamClosedError, errors.StreamError,
                                     ServiceNotAvailableError, errors.CircuitBreakerOpenError,
                                     errors.ProtocolError, errors.SerializationError, RemoteError,
                                     errors.BrokerDisconnectedError, errors.MaxCallLevelError])
    def test_no_oserror_where_the_transports_catch_it(self, cls: type[NerveError]) -> None:
        assert not issubclass(cls, OSError)
        assert not issubclass(cls, (ValueError, LookupError, RuntimeError))

    async def test_real_errors_are_caught_by_their_builtin(self) -> None:
        class Guarded(nerve.Service):
            name = "guarded"

            @nerve.action(guards=[lambda ctx: False])
            async def secret(self, ctx: nerve.Context) -> str:
                return "never"

            @nerve.action
            async def typed(self, ctx: nerve.Context, params: _Point) -> int:
                return params.x

        async with nerve.Broker("errcls-builtins", services=[Guarded()]) as b:
            with pytest.raises(PermissionError) as forbidden:
                await b.call("guarded.secret")
            assert type(forbidden.value) is ForbiddenError
            with pytest.raises(ValueError) as invalid:
                await b.call("guarded.typed", {"x": "not an int"})
            assert type(invalid.value) is ValidationError
            with pytest.raises(LookupError) as missing:
                await b.call("nobody.here")
            assert type(missing.value) is ServiceNotFoundError


class _Point(msgspec.Struct):
    x: int


# --- broker not running ---------------------------------------------------------------------


def test_broker_not_running_error() -> None:
    exc = BrokerNotRunningError("the broker is not running (use 'async with Broker(...)')")
    assert isinstance(exc, RuntimeError) and isinstance(exc, BrokerOptionsError)
    assert (exc.name, exc.code, exc.type) == ("BrokerNotRunningError", 500, "BROKER_NOT_RUNNING")
    assert "BrokerNotRunningError" in errors.__all__
    assert type(through_the_wire(exc)) is BrokerNotRunningError


# --- docstrings ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", errors.__all__)
def test_every_public_name_has_a_docstring_of_its_own(name: str) -> None:
    obj = getattr(errors, name)
    doc = vars(obj).get("__doc__") if isinstance(obj, type) else obj.__doc__
    assert doc and doc.strip(), name
    assert inspect.cleandoc(doc) != inspect.cleandoc(NerveError.__doc__ or "") or obj is NerveError


def test_the_module_docstring_documents_the_registry() -> None:
    doc = errors.__doc__ or ""
    for words in ("wire_name", "registered_errors", "RemoteError", "TypeError", "without calling its"):
        assert words in doc

"""A typed handler's ValidationError names the field: ``data.field`` is the path of the field
that is wrong or missing (a missing field's own name, as msgspec's "Object missing required
field `x`" gives it), ``None`` only when the params as a whole are not an object."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

import nerve
from nerve.errors import ValidationError
from nerve.service import specs_of

pytestmark = pytest.mark.anyio


class Point(msgspec.Struct):
    x: int
    y: int = 0


class Order(msgspec.Struct, rename="camel"):
    order_id: int
    where: Point
    items: list[Point] = []
    named: dict[str, Point] = {}


class Shop(nerve.Service):
    name = "shop"

    @nerve.action
    async def place(self, ctx: nerve.Context, params: Order) -> int:
        return params.order_id

    @nerve.event("shop.moved")
    async def moved(self, ctx: nerve.Context, data: Point) -> None:
        pass


CASES = [
    # (params, field, words in reason)
    ({"where": {"x": 1}}, "orderId", "missing required field `orderId`"),
    ({"orderId": 1}, "where", "missing required field `where`"),
    ({"orderId": 1, "where": {}}, "where.x", "missing required field `x`"),
    ({"orderId": 1, "where": {"x": 1}, "items": [{"x": 1}, {"y": 2}]}, "items[1].x", "missing required field `x`"),
    ({"orderId": 1, "where": {"x": 1}, "named": {"k": {}}}, "named[...].x", "missing required field `x`"),
    ({"orderId": "one", "where": {"x": 1}}, "orderId", "Expected `int`, got `str`"),
    ({"orderId": 1, "where": {"x": [1]}}, "where.x", "Expected `int`, got `array`"),
    ({"orderId": 1, "where": 5}, "where", "Expected `object`, got `int`"),
    ([1, 2], None, "Expected `object`, got `array`"),
]


def action_spec() -> Any:
    return next(a for a in specs_of(Shop())[0] if a.raw_name == "place")


@pytest.mark.parametrize(("params", "field", "reason"), CASES, ids=[str(c[1]) + "-" + c[2][:20] for c in CASES])
def test_the_field_is_named(params: Any, field: str | None, reason: str) -> None:
    with pytest.raises(ValidationError) as info:
        action_spec().convert_params(params)
    exc = info.value
    assert exc.data == {"action": "shop.place", "field": field, "reason": exc.data["reason"]}
    assert reason in exc.data["reason"] and " - at " not in exc.data["reason"]
    assert exc.code == 422 and isinstance(exc, ValueError)
    assert exc.message.startswith("invalid parameters for 'shop.place': ")


@pytest.mark.parametrize("remote", [False, True], ids=["local", "remote"])
async def test_a_call_with_a_missing_field_names_it(remote: bool) -> None:
    async with nerve.Broker("vf-client", services=[] if remote else [Shop()]) as client, \
            nerve.Broker("vf-server", services=[Shop()] if remote else []):
        await client.wait_for_services("shop")
        with pytest.raises(ValidationError) as info:
            await client.call("shop.place", {"orderId": 1, "where": {"y": 2}})
        assert info.value.data["field"] == "where.x"
        assert "missing required field `x`" in info.value.data["reason"]
        assert await client.call("shop.place", {"orderId": 7, "where": {"x": 1}}) == 7


def test_event_data_is_converted_with_the_field_named() -> None:
    spec = specs_of(Shop())[1][0]
    assert spec.convert_data({"x": "3"}) == Point(x=3)  # not strict, as params are
    with pytest.raises(ValidationError) as info:
        spec.convert_data({"y": 1})
    assert info.value.data == {"action": "shop.moved", "field": "x",
                               "reason": "Object missing required field `x`"}
    assert info.value.message.startswith("invalid data for 'shop.moved': ")

"""The routing function: a request's `model` against an immutable route table (no server)."""

import pytest

from loraflow.serving_routes import FirstUse, Followed, Route, RouteError, RouteTable, collisions, route

pytestmark = pytest.mark.unit

MR, NLG = "viggo-smollm2-lora", "viggo-nlg-smollm2-lora"
TABLE = RouteTable("smol", "production", {
    MR: Followed(MR, target=f"{MR}-v3", canary=(f"{MR}-v4", 0.5)),
    NLG: Followed(NLG, target=f"{NLG}-v1"),
}, servable=frozenset({f"{MR}-v3", f"{MR}-v4", f"{NLG}-v1", f"{MR}-v1"}), withdrawn={f"{MR}-v2": "its files changed"})


def test_each_stable_name_routes_to_its_own_models_version():
    assert route(TABLE, f"smol:{NLG}") == Route(f"smol:{NLG}-v1", "production", NLG)
    assert route(TABLE, f"smol:{MR}") == Route(f"smol:{MR}-v3", "production", MR)  # no split asked


def test_a_canary_takes_its_share_of_its_own_stable_name_only_by_the_requests_key():
    sides = {key: route(TABLE, f"smol:{MR}", key=key, split=True) for key in map(str, range(400))}
    to_canary = [key for key, r in sides.items() if r.kind == "canary"]
    assert 150 < len(to_canary) < 250 and {r.engine_model for r in sides.values()} == {f"smol:{MR}-v3", f"smol:{MR}-v4"}
    assert all(route(TABLE, f"smol:{MR}", key=key, split=True).kind == "canary" for key in to_canary)
    assert {route(TABLE, f"smol:{NLG}", key=key, split=True).kind for key in map(str, range(100))} == {"production"}


def test_versions_by_id_base_model_and_other_models():
    assert route(TABLE, f"smol:{MR}-v1") == Route(f"smol:{MR}-v1", "id", MR)
    assert route(TABLE, "smol") == Route("smol") and route(TABLE, "gpt-4") == Route("gpt-4") and route(TABLE, None) == Route(None)


@pytest.mark.parametrize("model, status, message", [
    ("smol:production", 404, f"smol:production names no model here: this server follows 2 registered models; ask "
                             f"for one by its stable name (smol:{NLG}, smol:{MR})."),
    (f"smol:{MR}-v2", 503, f"{MR}-v2 is not served: its files changed."),
    (f"smol:{MR}-v9", 404, f"Unknown adapter '{MR}-v9': /v1/models lists what is served."),
    ("smol:../x", 400, "Invalid adapter id '../x': use a name listed by /v1/models."),
])
def test_what_cannot_be_routed_says_why(model, status, message):
    with pytest.raises(RouteError) as refused:
        route(TABLE, model)
    assert (refused.value.status, refused.value.message) == (status, message)


def test_a_model_not_yet_published_is_published_at_its_first_request_by_name_or_id():
    """A followed model's version is published when first asked for (by its stable name, its alias or
    its id); other versions of it stay unknown."""
    waiting = RouteTable("smol", "production", {MR: Followed(MR, target=f"{MR}-v3", unpublished=True)},
                         servable=frozenset({f"{MR}-v1"}))
    for asked in (f"smol:{MR}", "smol:production", f"smol:{MR}-v3"):
        with pytest.raises(FirstUse) as first:
            route(waiting, asked, split=True)
        assert first.value.name == MR
    assert route(waiting, f"smol:{MR}-v1") == Route(f"smol:{MR}-v1", "id", MR)
    with pytest.raises(RouteError, match=f"Unknown adapter '{MR}-v2'"):
        route(waiting, f"smol:{MR}-v2")


def test_one_followed_model_keeps_the_alias_as_its_stable_name():
    one = RouteTable("smol", "production", {MR: Followed(MR, target=f"{MR}-v3")}, servable=frozenset({f"{MR}-v3"}))
    assert route(one, "smol:production") == route(one, f"smol:{MR}") == Route(f"smol:{MR}-v3", "production", MR)
    assert one.stable_names() == {f"smol:{MR}": MR, "smol:production": MR}


def test_a_followed_model_without_a_version_answers_why():
    table = RouteTable("smol", "production", {
        "new": Followed("new"), "other-base": Followed("other-base", why_not="other-base v1 was trained on another "
                                                                              "base model")})
    with pytest.raises(RouteError) as waiting:
        route(table, "smol:new")
    assert (waiting.value.status, waiting.value.message) == (503, "No version of new has the alias 'production' yet.")
    with pytest.raises(RouteError) as refused:
        route(table, "smol:other-base")
    assert (refused.value.status, refused.value.message) == (404, "other-base v1 was trained on another base model")


def test_a_table_cannot_be_changed_under_a_request():
    with pytest.raises(TypeError):
        TABLE.models["x"] = Followed("x")  # type: ignore[index]


def test_listed_names_that_would_share_a_stable_name_or_an_adapter_id_are_found():
    assert collisions([MR, NLG]) == []
    assert collisions([MR, MR, f"{MR}-v2"]) == [f"{MR} is listed twice",
                                               f"{MR}-v2 is also the adapter id of {MR}'s version 2"]

"""KeyStore by card: what a pulled card takes with it, and which card a VM's keys came from."""

from __future__ import annotations

from pam_svmm.services.key_store import KeyStore


def _store() -> tuple[KeyStore, dict[str, bytearray]]:
    store = KeyStore()
    a1, a2, b = bytearray(b"alice-web"), bytearray(b"alice-bank"), bytearray(b"bob-web")
    store.hold(1000, "s1", {"web": a1}, user="alice", card_serial="AAA")
    store.hold(1000, "s2", {"bank": a2}, user="alice", card_serial="CCC")
    store.hold(1001, "s3", {"web": b}, user="bob", card_serial="BBB")
    return store, {"a1": a1, "a2": a2, "b": b}


def test_drop_card_wipes_only_that_cards_sessions() -> None:
    store, bufs = _store()
    assert store.card_serials() == {"AAA", "BBB", "CCC"}
    dropped = store.drop_card("AAA ")  # token serials come space-padded from some modules
    assert [(d.session, d.volume, d.user, d.card_serial) for d in dropped] == [
        ("s1", "web", "alice", "AAA")
    ]
    assert bufs["a1"] == bytearray(len(b"alice-web"))  # zeroed
    assert store.held(1000) == {"bank"} and store.held(1001) == {"web"}
    assert store.card_serials(1000) == {"CCC"}
    assert store.drop_card("") == [] and store.drop_card("AAA") == []
    store.drop_card("BBB")
    assert store.sessions(1001) == [] and bufs["b"] == bytearray(len(b"bob-web"))


def test_card_for_names_the_card_whose_session_gives_the_keys() -> None:
    store, _ = _store()
    assert store.card_for(1000, ["web"]) == "AAA"
    assert store.card_for(1000, ["bank", "web"]) == "CCC"
    assert store.card_for(1000, []) == "CCC"  # the newest session
    assert store.card_for(1000, ["nope"]) == ""
    assert store.card_for(4242, []) == ""

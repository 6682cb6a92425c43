"""Configuration: defaults, the shipped example, and every refusal naming its key."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from pam_svmm import config
from pam_svmm.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]


def test_example_file_loads_and_is_not_the_defaults() -> None:
    cfg = config.load(ROOT / "config" / "svmm.toml")
    assert cfg.trust.anchors == (Path("/etc/svmm/ca/root.pem"),)
    assert cfg.mapping.rules[0].kind is config.MappingKind.UPN
    assert cfg.mapping.rules[0].domains == ("demo.example",)
    assert cfg.revocation.end_entity is config.RevocationRule.REQUIRE
    assert cfg.revocation.ca is config.RevocationRule.SOFT_FAIL


def test_empty_file_gives_defaults() -> None:
    cfg = config.parse({})
    assert cfg.pkcs11.module == config.P11_KIT_PROXY
    assert cfg.trust.extended_key_usages == (
        config.EKU_NAMES["clientAuth"],
        config.EKU_NAMES["smartcardLogon"],
    )


@pytest.mark.parametrize(
    ("text", "key", "words"),
    [
        ('[pkcs11]\nmodul = "/x"', "pkcs11.modul", "did you mean 'pkcs11.module'?"),
        ('[pkcs11]\nmodule = "libx.so"', "pkcs11.module", "absolute"),
        ('[pkcs11]\nuri = "token=x"', "pkcs11.uri", "pkcs11:"),
        ('[pkcs11]\npin_prompt = "{pin}"', "pkcs11.pin_prompt", "{token}"),
        ("[pkcs11]\nwait_for_card = -1", "pkcs11.wait_for_card", "at least"),
        ('[pkcs11]\nallow_pinpad = "yes"', "pkcs11.allow_pinpad", "true or false"),
        ('[trust]\nanchors = ["rel.pem"]', "trust.anchors[0]", "absolute"),
        ('[trust]\nanchors = "/a.pem"', "trust.anchors", "list of strings"),
        ('[trust]\nextended_key_usages = ["serverAuthx"]', "trust.extended_key_usages[0]", "OID"),
        ('[trust]\nkey_usages = ["sign"]', "trust.key_usages[0]", "digital_signature"),
        ("[trust]\nmax_chain_depth = 0", "trust.max_chain_depth", "between"),
        ('[revocation]\nend_entity = "maybe"', "revocation.end_entity", "soft-fail"),
        ('[revocation]\nmethods = ["ldap"]', "revocation.methods[0]", "ocsp"),
        ("[revocation]\nmethods = []", "revocation.methods", "empty"),
        ('[revocation]\nocsp_responder = "ftp://x"', "revocation.ocsp_responder", "http"),
        ("[revocation]\nfetch_timeout = 0", "revocation.fetch_timeout", "at least"),
        ('[[mapping.rules]]\nkind = "subject_attr"', "mapping.rules[0].oid", "required"),
        ('[[mapping.rules]]\nkind = "guess"', "mapping.rules[0].kind", "upn"),
        ("[mapping]\nrules = []", "mapping.rules", "non-empty"),
        ("[auth]\nchallenge_bytes = 8", "auth.challenge_bytes", "between"),
        ("[mutual]\nenabled = true", "mutual.host_cert", "required"),
        ('[audit]\npath = "audit.log"', "audit.path", "absolute"),
        ("x = 1", "x", "unknown key"),
        ("pkcs11 = 3", "pkcs11", "table"),
    ],
)
def test_bad_values_name_the_key(text: str, key: str, words: str) -> None:
    with pytest.raises(ConfigError) as err:
        config.parse(tomllib.loads(text))
    assert err.value.key == key
    assert words in str(err.value)


def test_missing_file_and_bad_toml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="file not found"):
        config.load(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[pkcs11\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        config.load(bad)


def test_path_resolution_never_reads_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(config.ENV_VAR, "/tmp/env.toml")
    assert config.resolve_path(None) == config.DEFAULT_PATH  # the PAM path: never the caller's
    assert config.resolve_path("/tmp/arg.toml") == Path("/tmp/arg.toml")

"""Configuration as an operator writes it: defaults < TOML < ``HERALD_*`` < flags,
groups from any of the three, and a clear ``ConfigError`` for anything that
would make the server misbehave. No sockets."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from herald_presence.protocol import tokens
from herald_presence.server.config import DEMO_GROUP, ConfigError, GroupConfig, Settings, ensure_demo_group, load

ACME = "acme-secret-0123456789"
ACME_OLD = "acme-old-secret-0123456789"
BETA = "beta-secret-0123456789"


def toml_file(tmp_path: Path, text: str) -> str:
    path = tmp_path / "herald.toml"
    path.write_text(text)
    return str(path)


# --- precedence


@pytest.mark.parametrize(
    ("name", "from_toml", "from_env", "from_flag"),
    [("port", 9001, 9002, 9003), ("grace_period", 1.5, 2.5, 0.25)],
)
def test_later_sources_win(tmp_path: Path, name: str, from_toml: float, from_env: float, from_flag: float) -> None:
    config = toml_file(tmp_path, f"{name} = {from_toml}\n")
    env = {"HERALD_" + name.upper(): str(from_env)}
    flags = {name: str(from_flag)}  # the CLI hands flags over as strings

    assert getattr(load(env={}), name) == getattr(Settings(), name)
    assert getattr(load(config, env={}), name) == from_toml
    assert getattr(load(config, env=env), name) == from_env
    assert getattr(load(config, env=env, flags=flags), name) == from_flag


def test_a_source_that_leaves_a_setting_out_keeps_the_earlier_value(tmp_path: Path) -> None:
    config = toml_file(tmp_path, "port = 9001\nkeepalive = 7.0\n")
    settings = load(
        config,
        env={"HERALD_GRACE_PERIOD": "0.5"},
        flags={"port": None, "keepalive": None, "signal_hold": "2"},  # None: a flag that was not given
    )
    assert (settings.port, settings.keepalive, settings.grace_period, settings.signal_hold) == (9001, 7.0, 0.5, 2.0)
    assert settings.handshake_timeout == Settings().handshake_timeout


def test_settings_are_typed_whatever_their_source(tmp_path: Path) -> None:
    from_env = load(env={"HERALD_PORT": "9000", "HERALD_COOKIE_SECURE": "true", "HERALD_KEEPALIVE": "3"})
    from_toml = load(toml_file(tmp_path, "port = 9000\ncookie_secure = true\nkeepalive = 3\n"), env={})
    for settings in (from_env, from_toml):
        assert settings.port == 9000 and type(settings.port) is int
        assert settings.cookie_secure is True
        assert settings.keepalive == 3.0 and type(settings.keepalive) is float


@pytest.mark.parametrize(("raw", "value"), [("1", True), ("yes", True), ("On", True), ("0", False), ("off", False)])
def test_booleans_read_the_usual_spellings(raw: str, value: bool) -> None:
    assert load(env={"HERALD_COOKIE_SECURE": raw}).cookie_secure is value


def test_the_process_environment_is_read_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HERALD_PORT", "9100")
    monkeypatch.setenv("HERALD_GROUPS", f"acme={ACME}")
    settings = load()
    assert settings.port == 9100
    assert list(settings.groups) == ["acme"]


def test_unknown_herald_variables_are_ignored_with_a_warning_naming_the_closest_setting() -> None:
    """Other tools (deploy scripts, CI) may own HERALD_* names too: a warning, not a refusal."""
    warnings: list[str] = []
    env = {"HERALD_COLOUR": "blue", "HERALD_REDIS_UR": "redis://r:6379", "HERALD_PORT": "9000", "PORT": "1"}
    settings = load(env=env, warnings=warnings)
    assert settings.port == 9000 and settings.redis_url == ""
    assert warnings == [
        "HERALD_COLOUR is not a Herald setting: ignored (strict_env=true refuses to start instead)",
        "HERALD_REDIS_UR is not a Herald setting (did you mean HERALD_REDIS_URL?): ignored"
        " (strict_env=true refuses to start instead)",
    ]


def test_unknown_herald_variables_are_logged_when_nobody_collects_the_warnings(
    caplog: pytest.LogCaptureFixture,
) -> None:
    load(env={"HERALD_GROUP": f"acme={ACME}"})
    assert "HERALD_GROUP is not a Herald setting (did you mean HERALD_GROUPS?)" in caplog.text


@pytest.mark.parametrize("source", ["env", "flag", "toml"])
def test_strict_env_refuses_unknown_herald_variables(tmp_path: Path, source: str) -> None:
    env = {"HERALD_GRACE_PERIDO": "1"}
    if source == "env":
        env["HERALD_STRICT_ENV"] = "1"
    config = toml_file(tmp_path, "strict_env = true\n") if source == "toml" else None
    with pytest.raises(ConfigError, match=r"HERALD_GRACE_PERIDO .*did you mean HERALD_GRACE_PERIOD\?.*strict_env"):
        load(config, env=env, flags={"strict_env": "true"} if source == "flag" else {})


def test_kubernetes_service_links_are_not_unknown_settings() -> None:
    env = {
        "HERALD_STRICT_ENV": "1",
        "HERALD_SERVICE_HOST": "10.0.0.5",
        "HERALD_SERVICE_PORT_HTTP": "80",
        "HERALD_REDIS_PORT": "tcp://10.0.0.6:6379",
        "HERALD_REDIS_PORT_6379_TCP_PROTO": "tcp",
    }
    assert load(env=env).strict_env is True


def test_session_secret_and_metrics_port_are_checked_when_loading() -> None:
    with pytest.raises(ConfigError, match="session_secret must be url-safe base64"):
        load(env={}, flags={"session_secret": "not base64!"})
    with pytest.raises(ConfigError, match="session_secret must decode to 32 bytes"):
        load(env={}, flags={"session_secret": "c2hvcnQ="})
    assert load(env={}, flags={"session_secret": "A" * 43 + "="}).session_secret
    with pytest.raises(ConfigError, match="metrics_port must differ from port"):
        load(env={}, flags={"port": "9000", "metrics_port": "9000"})
    assert load(env={"HERALD_METRICS_PORT": "9100"}).metrics_port == 9100


# --- groups


def test_toml_groups_carry_two_secrets_and_allowed_origins(tmp_path: Path) -> None:
    config = toml_file(
        tmp_path,
        f"""
[groups.acme]
secrets = ["{ACME}", "{ACME_OLD}"]
allowed_origins = ["https://crm.acme.example", "https://agents.acme.example"]

[groups.beta]
secrets = ["{BETA}"]
""",
    )
    groups = load(config, env={}).groups
    assert groups == {
        "acme": GroupConfig("acme", [ACME, ACME_OLD], ["https://crm.acme.example", "https://agents.acme.example"]),
        "beta": GroupConfig("beta", [BETA], []),
    }


def test_a_rotated_group_accepts_tokens_signed_with_either_secret(tmp_path: Path) -> None:
    config = toml_file(tmp_path, f'[groups.acme]\nsecrets = ["{ACME}", "{ACME_OLD}"]\n')
    acme = load(config, env={}).groups["acme"]
    now = time.time()
    for secret in (ACME, ACME_OLD):
        token = tokens.visitor_token(secret, "acme", "cust-42")
        assert tokens.verify_token(acme.secrets, tokens.VISITOR, "acme", "cust-42", token, now=now) > now


def test_groups_from_the_environment() -> None:
    groups = load(env={"HERALD_GROUPS": f"acme={ACME}, beta={BETA}"}).groups
    assert groups == {"acme": GroupConfig("acme", [ACME]), "beta": GroupConfig("beta", [BETA])}


def test_groups_from_flags() -> None:
    # `--group acme=... --group beta=...`: the CLI joins repeated flags with commas.
    groups = load(env={}, flags={"groups": f"acme={ACME},beta={BETA}"}).groups
    assert groups == {"acme": GroupConfig("acme", [ACME]), "beta": GroupConfig("beta", [BETA])}


def test_a_secret_may_contain_equals_signs() -> None:
    secret = "base64-ish-secret-0123456789=="
    assert load(env={"HERALD_GROUPS": f"acme={secret}"}).groups["acme"].secrets == [secret]


def test_groups_from_all_sources_add_up_and_a_later_one_replaces_the_same_id(tmp_path: Path) -> None:
    config = toml_file(tmp_path, f'[groups.acme]\nsecrets = ["{ACME_OLD}"]\n')
    replacement = "acme-newest-secret-0123456789"
    groups = load(config, env={"HERALD_GROUPS": f"beta={BETA}"}, flags={"groups": f"acme={replacement}"}).groups
    assert set(groups) == {"acme", "beta"}
    assert groups["acme"].secrets == [replacement]


# --- refusals


def test_a_secret_of_sixteen_characters_is_enough() -> None:
    assert load(env={}, flags={"groups": "acme=" + "s" * 16}).groups["acme"].secrets == ["s" * 16]


def test_a_short_secret_is_refused_from_any_source(tmp_path: Path) -> None:
    short = "s" * 15
    with pytest.raises(ConfigError, match="16"):
        load(env={}, flags={"groups": f"acme={short}"})
    with pytest.raises(ConfigError, match="16"):
        load(env={"HERALD_GROUPS": f"acme={ACME},beta={short}"})
    with pytest.raises(ConfigError, match="16"):
        load(toml_file(tmp_path, f'[groups.acme]\nsecrets = ["{ACME}", "{short}"]\n'), env={})


@pytest.mark.parametrize("pair", ["acme", "acme=", "=" + ACME])
def test_a_group_without_id_or_secret_is_refused(pair: str) -> None:
    with pytest.raises(ConfigError):
        load(env={"HERALD_GROUPS": pair})


@pytest.mark.parametrize("group_id", ["bad group", "acme/eu", "ümlaut", "x" * 129])
def test_a_bad_group_id_is_refused(tmp_path: Path, group_id: str) -> None:
    with pytest.raises(ConfigError):
        load(env={}, flags={"groups": f"{group_id}={ACME}"})
    with pytest.raises(ConfigError):
        load(toml_file(tmp_path, f'[groups."{group_id}"]\nsecrets = ["{ACME}"]\n'), env={})


@pytest.mark.parametrize(
    ("name", "raw"),
    [
        ("port", "eighty"),
        ("port", "8765.5"),
        ("port", "--80"),  # a typo, not a crash
        ("port", "70000"),  # no such TCP port
        ("port", "-1"),
        ("max_queue", "many"),
        ("max_queue", "0"),
        ("max_frame_bytes", "100"),
        ("keepalive", "soon"),
        ("keepalive", "0"),
        ("keepalive", "inf"),  # never ping: dead clients are never found
        ("handshake_timeout", "-2"),
        ("grace_period", "nope"),
        ("grace_period", "nan"),  # compares false with everything, so no check ever fires
        ("signal_hold", "-1"),
        ("max_connections_per_address", "0"),  # nobody could connect
        ("max_connections", "-1"),
        ("request_timeout", "0"),
        ("request_timeout", "inf"),  # a half-sent request held for good
        ("message_bytes_rate", "0"),
        ("message_bytes_burst", "65535"),  # under max_frame_bytes: the largest frames could never pass
    ],
)
def test_a_bad_number_is_refused(name: str, raw: str) -> None:
    with pytest.raises(ConfigError, match=name):
        load(env={}, flags={name: raw})
    with pytest.raises(ConfigError, match=name):
        load(env={"HERALD_" + name.upper(): raw})


@pytest.mark.parametrize("value", ["8765.5", "true", '"eighty"'])
def test_a_port_that_is_not_a_whole_number_is_refused_in_toml(tmp_path: Path, value: str) -> None:
    """TOML is typed: 8765.5 or true are not silently turned into a port."""
    with pytest.raises(ConfigError, match="port"):
        load(toml_file(tmp_path, f"port = {value}\n"), env={})


@pytest.mark.parametrize("raw", ["maybe", "2", "", "truthy"])
def test_a_bad_boolean_is_refused(tmp_path: Path, raw: str) -> None:
    with pytest.raises(ConfigError, match="cookie_secure"):
        load(env={"HERALD_COOKIE_SECURE": raw})
    with pytest.raises(ConfigError, match="cookie_secure"):
        load(toml_file(tmp_path, f'cookie_secure = "{raw}"\n'), env={})


@pytest.mark.parametrize("raw", ["-1", "-0.1"])
def test_a_negative_grace_period_is_refused(tmp_path: Path, raw: str) -> None:
    with pytest.raises(ConfigError, match="grace_period"):
        load(env={}, flags={"grace_period": raw})
    with pytest.raises(ConfigError, match="grace_period"):
        load(toml_file(tmp_path, f"grace_period = {raw}\n"), env={})


def test_a_zero_grace_period_is_allowed() -> None:
    assert load(env={}, flags={"grace_period": "0"}).grace_period == 0.0


@pytest.mark.parametrize(("name", "raw"), [("cookie_samesite", "Loose"), ("log_level", "LOUD"), ("log_format", "xml")])
def test_a_value_outside_the_documented_choices_is_refused(name: str, raw: str) -> None:
    with pytest.raises(ConfigError, match=name):
        load(env={"HERALD_" + name.upper(): raw})


def test_an_unknown_toml_key_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="grace_peroid"):
        load(toml_file(tmp_path, "grace_peroid = 1.0\n"), env={})


def test_consumer_codes_are_a_group_choice_off_by_default(tmp_path: Path) -> None:
    config = toml_file(
        tmp_path,
        f'[groups.acme]\nsecrets = ["{ACME}"]\nallow_consumer_codes = true\n\n[groups.beta]\nsecrets = ["{BETA}"]\n',
    )
    groups = load(config, env={"HERALD_GROUPS": f"gamma={ACME}"}).groups
    assert groups["acme"].allow_consumer_codes is True
    assert groups["beta"].allow_consumer_codes is False
    assert groups["gamma"].allow_consumer_codes is False  # id=secret pairs never opt in
    with pytest.raises(ConfigError, match="allow_consumer_codes"):
        load(toml_file(tmp_path, f'[groups.acme]\nsecrets = ["{ACME}"]\nallow_consumer_codes = "yes"\n'), env={})


def test_an_unknown_key_in_a_toml_group_is_refused(tmp_path: Path) -> None:
    """A typo such as ``allowed_origin`` must not silently leave a group without its origins."""
    config = toml_file(
        tmp_path, f'[groups.acme]\nsecrets = ["{ACME}"]\nallowed_origin = ["https://crm.acme.example"]\n'
    )
    with pytest.raises(ConfigError, match="allowed_origin"):
        load(config, env={})


@pytest.mark.parametrize(
    "text",
    [
        f'groups = "acme={ACME}"\n',  # groups must be tables
        f'[groups.acme]\nsecrets = "{ACME}"\n',  # secrets must be a list
        f'[groups.acme]\nsecrets = ["{ACME}"]\nallowed_origins = "https://crm.acme.example"\n',  # so must origins
    ],
    ids=["groups-not-tables", "secrets-not-a-list", "origins-not-a-list"],
)
def test_a_toml_group_of_the_wrong_shape_is_refused(tmp_path: Path, text: str) -> None:
    with pytest.raises(ConfigError):
        load(toml_file(tmp_path, text), env={})


def test_an_unreadable_toml_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"missing\.toml"):
        load(str(tmp_path / "missing.toml"), env={})
    with pytest.raises(ConfigError):
        load(toml_file(tmp_path, "port = \n"), env={})


# --- the demo group


def test_a_server_with_no_group_gets_a_random_demo_group() -> None:
    settings = load(env={})
    demo = ensure_demo_group(settings)
    assert demo is not None and demo.demo
    assert demo.id == DEMO_GROUP == "demo"
    assert len(demo.secrets) == 1 and len(demo.secrets[0]) >= 16
    assert settings.groups == {"demo": demo}
    assert demo.allow_consumer_codes  # so that the demo's consumer page works
    assert ensure_demo_group(settings) is None  # once is enough


def test_each_demo_group_has_its_own_secret() -> None:
    first, second = ensure_demo_group(Settings()), ensure_demo_group(Settings())
    assert first is not None and second is not None
    assert first.secrets != second.secrets


def test_a_configured_group_means_no_demo_group() -> None:
    settings = load(env={"HERALD_GROUPS": f"acme={ACME}"})
    assert ensure_demo_group(settings) is None
    assert list(settings.groups) == ["acme"]
    assert not settings.groups["acme"].demo


@pytest.mark.parametrize(
    ("flags", "complaint"),
    [
        ({"workers": "0"}, "workers must be at least 1"),
        ({"workers": "2"}, "needs redis_url"),
        ({"workers": "2", "redis_url": "redis://127.0.0.1:1/0", "port": "0"}, "fixed port"),
        ({"drain_timeout": "0"}, "drain_timeout"),
        ({"drain_spread": "-1"}, "drain_spread"),
    ],
)
def test_workers_and_drain_settings_that_cannot_work_are_refused(flags: dict[str, str], complaint: str) -> None:
    with pytest.raises(ConfigError, match=complaint):
        load(env={}, flags=flags)

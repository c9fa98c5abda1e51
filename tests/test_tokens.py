"""Visitor tokens and agent keys: minting, verifying, expiry and rotation."""

from __future__ import annotations

import string

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from herald_presence.protocol.errors import ErrorCode, ProtocolError
from herald_presence.protocol.tokens import (
    AGENT,
    MAX_TOKEN_LIFETIME,
    VISITOR,
    agent_key,
    make_token,
    verify_token,
    visitor_token,
)

SECRET = "s3cret-of-acme"
OLD_SECRET = "previous-secret-of-acme"
NOW = 1_767_225_600  # 2026-01-01T00:00:00Z
GROUP = "acme"
VISITOR_ID = "v-42"
AGENT_ID = "agent-7"


def refusal(
    token: str,
    *,
    secrets: tuple[str, ...] = (SECRET,),
    role: str = VISITOR,
    group: str = GROUP,
    subject: str = VISITOR_ID,
    now: float = NOW,
) -> ProtocolError:
    """The error ``verify_token`` raises for ``token`` (fails the test if it verifies)."""
    with pytest.raises(ProtocolError) as info:
        verify_token(secrets, role, group, subject, token, now=now)
    return info.value


def minted(role: str = VISITOR, subject: str = VISITOR_ID, *, secret: str = SECRET, ttl: float = 3600) -> str:
    return make_token(secret, role, GROUP, subject, ttl=ttl, now=NOW)


# --- round trips -----------------------------------------------------------------


@pytest.mark.parametrize(("role", "subject"), [(VISITOR, VISITOR_ID), (AGENT, AGENT_ID)])
def test_a_minted_token_verifies_and_returns_its_expiry(role: str, subject: str) -> None:
    token = minted(role, subject)
    assert token.startswith(f"{NOW + 3600}.")
    assert verify_token([SECRET], role, GROUP, subject, token, now=NOW) == NOW + 3600


def test_visitor_token_helper_mints_a_visitor_token() -> None:
    token = visitor_token(SECRET, GROUP, VISITOR_ID)
    assert verify_token([SECRET], VISITOR, GROUP, VISITOR_ID, token) > 0


def test_agent_key_helper_mints_an_agent_key() -> None:
    token = agent_key(SECRET, GROUP, AGENT_ID)
    assert verify_token([SECRET], AGENT, GROUP, AGENT_ID, token) > 0


def test_minting_is_deterministic() -> None:
    assert minted() == minted()


ids = st.text(string.ascii_letters + string.digits + "._:@+-", min_size=1, max_size=128)


@settings(max_examples=300, deadline=None)
@given(
    secret=st.text(min_size=1, max_size=64),
    role=st.sampled_from([VISITOR, AGENT]),
    group=ids,
    subject=ids,
    ttl=st.integers(0, MAX_TOKEN_LIFETIME),
)
def test_any_minted_token_verifies(secret: str, role: str, group: str, subject: str, ttl: int) -> None:
    token = make_token(secret, role, group, subject, ttl=ttl, now=NOW)
    assert verify_token([secret], role, group, subject, token, now=NOW) == NOW + ttl


# --- forgeries and misuse ---------------------------------------------------------------


def test_a_token_signed_with_another_secret_is_unauthorized() -> None:
    assert refusal(minted(secret="not-the-secret")).code == ErrorCode.UNAUTHORIZED


def test_a_token_for_another_group_is_unauthorized() -> None:
    assert refusal(minted(), group="globex").code == ErrorCode.UNAUTHORIZED


def test_a_token_for_another_subject_is_unauthorized() -> None:
    assert refusal(minted(), subject="v-43").code == ErrorCode.UNAUTHORIZED


def test_a_visitor_token_is_not_an_agent_key() -> None:
    token = minted(VISITOR, AGENT_ID)  # even when the IDs happen to be equal
    assert refusal(token, role=AGENT, subject=AGENT_ID).code == ErrorCode.UNAUTHORIZED


def test_an_agent_key_is_not_a_visitor_token() -> None:
    token = minted(AGENT, VISITOR_ID)
    assert refusal(token, role=VISITOR, subject=VISITOR_ID).code == ErrorCode.UNAUTHORIZED


def test_a_token_with_a_moved_expiry_is_unauthorized() -> None:
    expires, _, signature = minted().partition(".")
    assert refusal(f"{int(expires) + 3600}.{signature}").code == ErrorCode.UNAUTHORIZED


def test_a_token_with_a_tampered_signature_is_unauthorized() -> None:
    token = minted()
    tampered = token[:-1] + ("A" if token[-1] != "A" else "B")
    assert refusal(tampered).code == ErrorCode.UNAUTHORIZED
    assert refusal(token + "A").code == ErrorCode.UNAUTHORIZED
    assert refusal(token[:-1]).code == ErrorCode.UNAUTHORIZED


def test_no_secrets_means_nothing_verifies() -> None:
    assert refusal(minted(), secrets=()).code == ErrorCode.UNAUTHORIZED


# --- expiry and lifetime ----------------------------------------------------------------


def test_an_expired_token_is_token_expired() -> None:
    assert refusal(minted(ttl=3600), now=NOW + 3601).code == ErrorCode.TOKEN_EXPIRED


def test_a_token_is_valid_up_to_its_expiry_second() -> None:
    assert verify_token([SECRET], VISITOR, GROUP, VISITOR_ID, minted(ttl=3600), now=NOW + 3600) == NOW + 3600


def test_a_forged_expired_token_is_unauthorized_not_expired() -> None:
    # The signature is checked first, so a forger learns nothing from expiry.
    assert refusal(minted(secret="forged", ttl=10), now=NOW + 3600).code == ErrorCode.UNAUTHORIZED


def test_a_lifetime_beyond_the_maximum_is_refused() -> None:
    assert refusal(minted(ttl=MAX_TOKEN_LIFETIME + 1)).code == ErrorCode.UNAUTHORIZED


def test_a_lifetime_of_exactly_the_maximum_is_accepted() -> None:
    token = minted(ttl=MAX_TOKEN_LIFETIME)
    assert verify_token([SECRET], VISITOR, GROUP, VISITOR_ID, token, now=NOW) == NOW + MAX_TOKEN_LIFETIME


# --- malformed strings --------------------------------------------------------------------

_SIGNATURE = minted().partition(".")[2]


@pytest.mark.parametrize(
    "token",
    [
        "",
        "abc",
        "123.",
        ".sig",
        f".{_SIGNATURE}",
        "12a4.sig",
        "-5.sig",
        "+5.sig",
        " 5.sig",
        "1.5e9.sig",
        f"{'9' * 20}.sig",
        f"{'9' * 13}.sig",
        ".",
        "..",
    ],
    ids=[
        "empty",
        "no-dot",
        "no-signature",
        "no-expiry",
        "no-expiry-real-signature",
        "non-digit-expiry",
        "negative-expiry",
        "plus-sign",
        "leading-space",
        "exponent",
        "20-digit-expiry",
        "13-digit-expiry",
        "dot",
        "two-dots",
    ],
)
def test_a_malformed_token_is_unauthorized(token: str) -> None:
    assert refusal(token).code == ErrorCode.UNAUTHORIZED


def test_a_20_digit_expiry_is_refused_even_when_correctly_signed() -> None:
    expires = 10**19
    token = f"{expires}.{minted().partition('.')[2]}"
    assert refusal(token).code == ErrorCode.UNAUTHORIZED
    huge = make_token(SECRET, VISITOR, GROUP, VISITOR_ID, ttl=expires, now=0)
    assert len(huge.partition(".")[0]) == 20
    assert refusal(huge).code == ErrorCode.UNAUTHORIZED


@settings(max_examples=300, deadline=None)
@given(token=st.text(max_size=80))
def test_arbitrary_strings_are_refused_with_a_protocol_error(token: str) -> None:
    assert refusal(token).code == ErrorCode.UNAUTHORIZED


@pytest.mark.parametrize("expires", ["²", "1²", "①"])
def test_a_superscript_digit_expiry_is_unauthorized(expires: str) -> None:
    assert refusal(f"{expires}.sig").code == ErrorCode.UNAUTHORIZED


def test_a_token_rewritten_in_arabic_indic_digits_is_unauthorized() -> None:
    expires, _, signature = minted().partition(".")
    rewritten = "".join(chr(0x0660 + int(digit)) for digit in expires)  # "١٧٦٧٢٢٩٢٠٠"
    assert refusal(f"{rewritten}.{signature}").code == ErrorCode.UNAUTHORIZED


def test_a_signature_with_a_lone_surrogate_is_unauthorized() -> None:
    assert refusal("1.\ud800").code == ErrorCode.UNAUTHORIZED


# --- rotation --------------------------------------------------------------------------


def test_during_a_rotation_tokens_of_both_secrets_verify() -> None:
    for secret in (OLD_SECRET, SECRET):
        for role, subject in ((VISITOR, VISITOR_ID), (AGENT, AGENT_ID)):
            token = minted(role, subject, secret=secret)
            assert verify_token([OLD_SECRET, SECRET], role, GROUP, subject, token, now=NOW) == NOW + 3600
            assert verify_token([SECRET, OLD_SECRET], role, GROUP, subject, token, now=NOW) == NOW + 3600


def test_secrets_can_be_any_iterable() -> None:
    token = minted(secret=OLD_SECRET)
    assert verify_token(iter([SECRET, OLD_SECRET]), VISITOR, GROUP, VISITOR_ID, token, now=NOW) == NOW + 3600
    assert verify_token((s for s in (OLD_SECRET,)), VISITOR, GROUP, VISITOR_ID, token, now=NOW) == NOW + 3600


def test_after_a_rotation_tokens_of_the_old_secret_are_unauthorized() -> None:
    assert refusal(minted(secret=OLD_SECRET), secrets=(SECRET,)).code == ErrorCode.UNAUTHORIZED
    assert verify_token([SECRET], VISITOR, GROUP, VISITOR_ID, minted(), now=NOW) == NOW + 3600

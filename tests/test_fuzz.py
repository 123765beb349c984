"""Property-based fuzzing (hypothesis) of the two doors untrusted input comes through:
the webhook receiver and `EditRequest.from_dict` (every producer's validation), and the
batch files' quick check against the full one.

No input may produce a 500 or an exception other than the documented refusal. The
runs are derandomized with modest example counts, so CI sees the same few hundred
inputs every time in a few seconds; the regression inputs found so far are pinned as
explicit examples.
"""

from __future__ import annotations

import json
import math
import time
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from webhook_receiver.app import create_app
from worker.domain import ENVELOPE_FIELDS, REQUEST_FIELDS, EditRequest, JobState
from worker.errors import ValidationError
from worker.items import item_parts, plain_item
from worker.settings import Settings
from worker.signing import job_token, sign_v3
from worker.store import JobStore

PID = "0123456789abcdef0123456789abcdef"
FUZZ = settings(
    derandomize=True,
    database=None,  # nothing written into the checkout; derandomized runs repeat anyway
    max_examples=100,
    deadline=None,  # a loaded CI machine must not turn slowness into failures
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

# --- strategies ------------------------------------------------------------------------

lone_surrogates = st.text(
    alphabet=st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF), min_size=1, max_size=3
)
texts = st.one_of(st.text(max_size=40), lone_surrogates, st.sampled_from(["", " ", "\x00"]))
numbers = st.one_of(
    st.integers(),
    st.integers(min_value=10**300, max_value=10**400),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([-1, 0, 1, 3.5, 20, 20.000001, 2_147_483_647, 2_147_483_648]),
)
scalars = st.one_of(st.none(), st.booleans(), numbers, texts)
json_values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
urls = st.one_of(
    st.sampled_from(
        [
            "https://example.com/a.jpg",
            "http://example.com/a.jpg",
            "ftp://example.com/a.jpg",
            "javascript:alert(1)",
            "data:image/png;base64,AAAA",
            "https://",
            "http://[::1",
            "https://exa mple.com/a.jpg",
            "https://example.com/" + "a" * 5000,
        ]
    ),
    st.builds(lambda s: f"https://example.com/{s}", texts),
    texts,
)
near_valid_requests = st.fixed_dictionaries(
    {"prompt": st.one_of(texts, st.just("x" * 4001), scalars), "image": st.one_of(urls, scalars)},
    optional={
        "seed": st.one_of(numbers, scalars),
        "guidance_scale": st.one_of(numbers, scalars),
        "aspect_ratio": st.one_of(st.sampled_from(["16:9", "1:1", "9:21", "1:2"]), json_values),
        "batch_id": json_values,
        "idempotency_key": json_values,
        "extra": json_values,
    },
)
any_request = st.one_of(
    near_valid_requests,
    json_values,
    st.dictionaries(st.sampled_from([*REQUEST_FIELDS, *ENVELOPE_FIELDS]), json_values),
)


def httpx_encodes(payload: dict[str, Any]) -> bytes:
    """The request body exactly as httpx's `json=` would encode it for the submit."""
    return json.dumps(payload, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode()


# --- EditRequest -----------------------------------------------------------------------


@FUZZ
@given(data=any_request)
@example(data={"prompt": "p", "image": "https://example.com/a.jpg", "guidance_scale": 10**400})
@example(data={"prompt": "p\ud800", "image": "https://example.com/a.jpg"})
@example(data={"prompt": "p", "image": "https://example.com/\udfff.jpg"})
@example(data={"prompt": "p", "image": "https://example.com/a.jpg", "guidance_scale": math.nan})
def test_edit_request_accepts_or_refuses_naming_fields(data: object) -> None:
    """Any JSON-like value either validates into a request the provider call can encode and
    that round-trips, or is refused with a ValidationError naming each bad field."""
    try:
        request = EditRequest.from_dict(data)
    except ValidationError as exc:
        assert exc.errors and all(isinstance(e.field, str) and e.message for e in exc.errors)
        allowed = {*REQUEST_FIELDS, "request"}
        if isinstance(data, dict):
            allowed |= {str(k) for k in data}
        assert {e.field for e in exc.errors} <= allowed
        return
    payload = request.to_payload()
    assert httpx_encodes(payload)
    assert EditRequest.from_dict(payload) == request


plain_prompts = st.one_of(
    texts,
    st.text(alphabet=st.sampled_from(" \t\n\x85\xa0\u2028\u3000\x00"), min_size=1, max_size=3),
    st.builds(lambda n: "x" * n, st.integers(3995, 4005)),
    scalars,
)
plain_images = st.one_of(
    urls,
    st.builds(
        lambda scheme, host, rest: f"{scheme}://{host}{rest}",
        st.sampled_from(["http", "https", "HTTPS", "ftp"]),
        st.one_of(st.sampled_from(["example.com", "a-b.c:8080", "x:99999", "", "[::1]"]), texts),
        st.one_of(st.sampled_from(["", "/a.jpg", "?q=1", "#f", "/a b", "/\x7f"]), texts),
    ),
    st.builds(lambda n: "https://e.com/" + "a" * n, st.integers(4075, 4090)),
)


@FUZZ
@given(prompt=plain_prompts, image=plain_images)
@example(prompt="\u3000", image="https://example.com/a.jpg")
@example(prompt="x" * 4001, image="https://example.com/a.jpg")
@example(prompt="p", image="https://e.com/" + "a" * 4083)
def test_the_batch_files_quick_check_accepts_only_what_the_full_check_does(
    prompt: object, image: object
) -> None:
    """`plain_item` (the usual bulk line, checked at a fraction of the cost) may say "not
    sure", never "valid" where the full check refuses; what it accepts is the same request."""
    data = {"prompt": prompt, "image": image}
    plain = plain_item(data)
    if plain is None:
        return
    request, key, priority, metadata = item_parts(data)
    assert request == EditRequest.plain(*plain) == EditRequest(prompt=plain[0], image=plain[1])
    assert (key, priority, metadata) == ("", 0, None)


# --- the receiver ----------------------------------------------------------------------

prediction_like = st.fixed_dictionaries(
    {},
    optional={
        "id": st.one_of(st.just(PID), st.text(alphabet="0123456789abcdef", max_size=33), scalars),
        "status": st.one_of(
            st.sampled_from(["completed", "failed", "processing", "created", "timeout"]), scalars
        ),
        "outputs": st.one_of(st.lists(st.one_of(urls, scalars), max_size=3), scalars),
        "error": json_values,
        "code": json_values,
        "has_nsfw_contents": json_values,
        "created_at": json_values,
    },
)
bodies = st.one_of(
    st.binary(max_size=300),
    st.builds(lambda v: json.dumps(v).encode(), prediction_like),
    st.builds(lambda v: json.dumps(v).encode(), json_values),
    st.builds(lambda v: json.dumps(v, ensure_ascii=False).encode("utf-8", "replace"), json_values),
)
header_text = st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=80)


@pytest.fixture
def client_and_settings(settings: Settings, store: JobStore) -> tuple[Any, Settings]:
    app = create_app(settings, store=store)
    app.testing = True  # an unhandled exception fails the test instead of becoming a 500
    now = time.time()
    store.create("job1", EditRequest(prompt="p", image="https://example.com/a.jpg"), now=now)
    store.transition("job1", JobState.SUBMITTING, now=now)
    store.transition(
        "job1",
        JobState.SUBMITTED,
        now=now,
        fields={"prediction_id": PID, "submitted_at": now},
        expect_prediction_id=PID,
    )
    return app.test_client(), settings


@FUZZ
@given(
    body=bodies,
    signing=st.sampled_from(["valid", "valid", "valid", "missing", "garbage"]),
    webhook_id=st.one_of(
        st.text(alphabet="0123456789abcdef", min_size=1, max_size=40), header_text
    ),
    # Weighted towards deliveries that pass the checks, so the later code paths get fuzzed.
    skew=st.one_of(st.just(0), st.just(0), st.integers(min_value=-(10**6), max_value=10**6)),
    job=st.one_of(st.just("job1"), st.just("job1"), st.text(max_size=20)),
    token_ok=st.sampled_from([True, True, True, False]),
    extra_headers=st.dictionaries(
        st.sampled_from(["webhook-signature", "webhook-timestamp", "content-type"]), header_text
    ),
)
def test_receiver_never_answers_500(
    client_and_settings: tuple[Any, Settings],
    store: JobStore,
    body: bytes,
    signing: str,
    webhook_id: str,
    skew: int,
    job: str,
    token_ok: bool,
    extra_headers: dict[str, str],
) -> None:
    """Any body, headers, signature state and URL get one of the stated answers, and the
    job never ends up with more than one event or a state outside the table."""
    client, cfg = client_and_settings
    stamp = str(int(time.time()) + skew)
    headers = {"webhook-id": webhook_id, "webhook-timestamp": stamp}
    if signing == "valid":
        headers["webhook-signature"] = sign_v3(cfg.webhook_secret, webhook_id, stamp, body)
        headers |= {k: v for k, v in extra_headers.items() if k == "content-type"}
    elif signing == "garbage":
        headers |= extra_headers
    token = job_token(cfg.secret_key, job) if token_ok else "0" * 32
    response = client.post(
        "/webhooks/wavespeed", query_string={"job": job, "t": token}, data=body, headers=headers
    )
    assert response.status_code in {200, 400, 401, 413}, response.get_data()
    assert response.is_json and "result" in response.get_json()
    events = [f for _, f in store.events() if f["job_id"] == "job1"]
    job1 = store.get("job1")
    assert job1 is not None and len(events) == (1 if job1.terminal else 0)

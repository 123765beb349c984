"""The pure core: request validation, the transition table, provider outcomes."""

from __future__ import annotations

import math

import pytest

from worker.domain import (
    ALLOWED_FROM,
    ASPECT_RATIOS,
    MAX_PROMPT_CHARS,
    EditRequest,
    JobState,
    Prediction,
    can_move,
    outcome_of,
    summary_line,
)
from worker.errors import ValidationError

GOOD = {"prompt": "make it blue", "image": "https://example.com/a.jpg"}


def fields_of(exc: pytest.ExceptionInfo[ValidationError]) -> set[str]:
    return {e.field for e in exc.value.errors}


def test_minimal_request_is_valid_and_payload_omits_unset_options() -> None:
    """Only prompt and image are required; unset options are left to the provider."""
    req = EditRequest.from_dict(GOOD)
    assert req.to_payload() == GOOD


def test_full_request_round_trips_to_payload() -> None:
    """Every documented option reaches the payload unchanged."""
    data = {**GOOD, "seed": 5, "guidance_scale": 7.5, "aspect_ratio": "16:9"}
    assert EditRequest.from_dict(data).to_payload() == data


@pytest.mark.parametrize(
    ("patch", "field"),
    [
        ({"prompt": ""}, "prompt"),
        ({"prompt": "   "}, "prompt"),
        ({"prompt": 5}, "prompt"),
        ({"prompt": "x" * (MAX_PROMPT_CHARS + 1)}, "prompt"),
        ({"image": "ftp://example.com/a.jpg"}, "image"),
        ({"image": "file:///etc/passwd"}, "image"),
        ({"image": "example.com/a.jpg"}, "image"),
        ({"image": "https://exa mple.com/a.jpg"}, "image"),
        ({"image": None}, "image"),
        ({"seed": -2}, "seed"),
        ({"seed": 2_147_483_648}, "seed"),
        ({"seed": 1.5}, "seed"),
        ({"seed": True}, "seed"),
        ({"guidance_scale": 0.5}, "guidance_scale"),
        ({"guidance_scale": 20.5}, "guidance_scale"),
        ({"guidance_scale": math.nan}, "guidance_scale"),
        ({"guidance_scale": math.inf}, "guidance_scale"),
        ({"guidance_scale": "3"}, "guidance_scale"),
        ({"aspect_ratio": "5:4"}, "aspect_ratio"),
        ({"enable_sync_mode": True}, "enable_sync_mode"),
    ],
)
def test_each_bad_field_is_named(patch: dict[str, object], field: str) -> None:
    """A bad value is refused with an error naming exactly that field."""
    with pytest.raises(ValidationError) as exc:
        EditRequest.from_dict({**GOOD, **patch})
    assert fields_of(exc) == {field}


def test_all_errors_reported_together_with_allowed_values() -> None:
    """Several bad fields give one error listing each, with what is allowed."""
    with pytest.raises(ValidationError) as exc:
        EditRequest.from_dict({"prompt": "", "image": "x", "aspect_ratio": "7:7"})
    assert fields_of(exc) == {"prompt", "image", "aspect_ratio"}
    assert "16:9" in str(exc.value)


def test_missing_required_fields_and_non_objects() -> None:
    """Missing prompt/image and non-object input are refused by name."""
    with pytest.raises(ValidationError) as exc:
        EditRequest.from_dict({})
    assert fields_of(exc) == {"prompt", "image"}
    with pytest.raises(ValidationError) as exc:
        EditRequest.from_dict(["prompt"])
    assert fields_of(exc) == {"request"}


def test_boundaries_are_inclusive() -> None:
    """The documented limits themselves are allowed."""
    for seed in (-1, 0, 2_147_483_647):
        EditRequest.from_dict({**GOOD, "seed": seed})
    for g in (1, 1.0, 20.0):
        EditRequest.from_dict({**GOOD, "guidance_scale": g})
    for ratio in ASPECT_RATIOS:
        EditRequest.from_dict({**GOOD, "aspect_ratio": ratio})


def test_terminal_states_absorb() -> None:
    """No transition leaves completed, failed or cancelled."""
    terminal = [JobState.COMPLETED, JobState.FAILED, JobState.CANCELLED]
    for source in terminal:
        for target in JobState:
            assert not can_move(source, target)
    for target, sources in ALLOWED_FROM.items():
        assert not (sources & set(terminal)), target


def test_the_only_backward_edge_is_the_submit_retry() -> None:
    """Moves go forward except submitting -> queued (a transient submit error)."""
    order = {
        JobState.QUEUED: 0,
        JobState.SUBMITTING: 1,
        JobState.SUBMITTED: 2,
        JobState.COMPLETED: 3,
        JobState.FAILED: 3,
        JobState.CANCELLED: 3,
    }
    backward = {
        (s, t) for t, sources in ALLOWED_FROM.items() for s in sources if order[t] <= order[s]
    }
    assert backward == {(JobState.SUBMITTING, JobState.QUEUED)}


PRED = {
    "id": "0123456789abcdef0123456789abcdef",
    "status": "completed",
    "outputs": ["https://example.invalid/o.jpeg"],
    "has_nsfw_contents": [False],
}


def test_outcomes_of_provider_statuses() -> None:
    """completed -> completed; failure statuses -> failed with a reason; others not final."""
    done = outcome_of(Prediction.from_json(PRED))
    assert done is not None and done.state is JobState.COMPLETED
    assert done.outputs == ("https://example.invalid/o.jpeg",)
    failed = outcome_of(
        Prediction.from_json(
            {**PRED, "status": "failed", "outputs": [], "error": "bad", "code": 1402}
        )
    )
    assert failed is not None and failed.state is JobState.FAILED
    assert failed.reason == "provider_failed" and "1402" in failed.error
    nsfw = outcome_of(Prediction.from_json({**PRED, "status": "failed", "code": 1200}))
    assert nsfw is not None and nsfw.reason == "nsfw"
    for status in ("timeout", "deleted", "cancelled"):
        out = outcome_of(Prediction.from_json({**PRED, "status": status, "outputs": []}))
        assert out is not None and out.state is JobState.FAILED and status in out.error
    for status in ("created", "processing", "something-new"):
        assert outcome_of(Prediction.from_json({**PRED, "status": status, "outputs": []})) is None


@pytest.mark.parametrize(
    "patch",
    [
        {"id": "XYZ"},
        {"id": None},
        {"status": 3},
        {"outputs": "https://x"},
        {"outputs": [1]},
        {"outputs": []},
    ],
)
def test_malformed_predictions_are_refused(patch: dict[str, object]) -> None:
    """A prediction missing what we rely on is a ValidationError, not a crash later."""
    with pytest.raises(ValidationError):
        Prediction.from_json({**PRED, **patch})


def test_summary_line_format() -> None:
    """The exact closing line of `kq run`."""
    counts = {"completed": 20, "failed": 3, "cancelled": 1, "webhook": 15, "poll": 8}
    assert summary_line(counts) == (
        "24 jobs: 20 completed, 3 failed, 1 cancelled (15 by webhook, 8 by poll)"
    )

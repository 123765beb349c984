"""`kq batch` as a user runs it (a subprocess) against a private Redis, no workers:
all-or-nothing validation, --skip-invalid, CSV, stdin, and resuming after a kill."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.conftest import wait_for

LINE = '{{"prompt": "edit number {i}", "image": "https://example.com/{i}.jpg"}}\n'


def kq(args: list[str], env: dict[str, str], **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(  # type: ignore[call-overload,no-any-return]
        [sys.executable, "-m", "kq.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        **kw,
    )


def cli_env(redis_url: str, tmp_path: Path) -> dict[str, str]:
    return {
        **os.environ,
        "KQ_REDIS_URL": redis_url,
        "KQ_VAR_DIR": str(tmp_path / "var"),
        "WAVESPEED_API_KEY": "unused-here",
        "KQ_WAVESPEED_BASE_URL": "http://127.0.0.1:9",
    }


def write_lines(path: Path, n: int, bad: dict[int, str] | None = None) -> Path:
    bad = bad or {}
    with path.open("w") as fh:
        for i in range(1, n + 1):
            fh.write(bad.get(i, LINE.format(i=i)))
    return path


def test_one_bad_line_in_100k_enqueues_nothing_and_says_where(
    redis_client: redis.Redis, redis_url: str, tmp_path: Path
) -> None:
    """All-or-nothing: a bad line 50,001 of 100,000 is named with its field; no job written."""
    bad = '{"prompt": "ok", "image": "https://e.com/x.jpg", "guidance_scale": 99}\n'
    path = write_lines(tmp_path / "big.jsonl", 100_000, {50_001: bad})
    result = kq(["batch", str(path)], cli_env(redis_url, tmp_path))
    assert result.returncode == 2
    out = " ".join((result.stdout + result.stderr).split())
    assert "line 50001: guidance_scale" in out and "1.0 to 20.0" in out
    assert "nothing was enqueued" in out
    assert redis_client.dbsize() == 0


def test_skip_invalid_enqueues_good_lines_and_writes_rejects(
    redis_client: redis.Redis, redis_url: str, tmp_path: Path
) -> None:
    """--skip-invalid enqueues the valid lines and writes each refused one with reasons."""
    path = write_lines(
        tmp_path / "mixed.jsonl", 10, {3: "not json\n", 7: '{"prompt": "", "image": "ftp://x"}\n'}
    )
    rejects = tmp_path / "rejects.jsonl"
    result = kq(
        ["batch", str(path), "--skip-invalid", "--rejects", str(rejects), "--batch-id", "mix"],
        cli_env(redis_url, tmp_path),
    )
    assert result.returncode == 0, result.stderr
    lines = [json.loads(x) for x in rejects.read_text().splitlines()]
    assert [x["line"] for x in lines] == [3, 7]
    assert {e["field"] for e in lines[1]["errors"]} == {"prompt", "image"}
    assert redis_client.hget("kq:batch:mix", "total") == "8"


def test_rerun_after_kill_resumes_without_duplicates(
    redis_client: redis.Redis, redis_url: str, tmp_path: Path
) -> None:
    """Kill `kq batch` half-way, run it again: every line is one job, none twice."""
    n = 30_000
    path = write_lines(tmp_path / "resume.jsonl", n)
    env = cli_env(redis_url, tmp_path)
    proc = subprocess.Popen(
        [sys.executable, "-m", "kq.cli", "batch", str(path), "--batch-id", "r1"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for(lambda: int(redis_client.hget("kq:batch:r1", "total") or 0) >= 2000, 60, 0.005)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(30)
    written = int(redis_client.hget("kq:batch:r1", "total") or 0)
    assert 0 < written < n, "the kill should land half-way"
    result = kq(["batch", str(path), "--batch-id", "r1", "--json"], env)
    assert result.returncode == 0, result.stderr
    receipt = json.loads(result.stdout)
    assert receipt["existing"] == written and receipt["created"] == n - written
    assert redis_client.hget("kq:batch:r1", "total") == str(n)
    assert redis_client.llen("kq:batchjobs:r1") == n
    again = json.loads(kq(["batch", str(path), "--batch-id", "r1", "--json"], env).stdout)
    assert again["created"] == 0 and again["existing"] == n


def test_csv_and_stdin(redis_client: redis.Redis, redis_url: str, tmp_path: Path) -> None:
    """CSV cells are typed (seed, guidance); stdin works with `-`; bad cells name the field."""
    csv_path = tmp_path / "edits.csv"
    csv_path.write_text(
        "prompt,image,seed,guidance_scale,aspect_ratio\n"
        '"make it, blue",https://e.com/1.jpg,5,4.5,16:9\n'
        "make it red,https://e.com/2.jpg,,,\n"
    )
    env = cli_env(redis_url, tmp_path)
    result = kq(["batch", str(csv_path), "--batch-id", "csv1"], env)
    assert result.returncode == 0, result.stderr
    ids = redis_client.lrange("kq:batchjobs:csv1", 0, -1)
    first = json.loads(redis_client.hget(f"kq:job:{ids[0]}", "request") or "{}")
    assert first == {
        "prompt": "make it, blue",
        "image": "https://e.com/1.jpg",
        "seed": 5,
        "guidance_scale": 4.5,
        "aspect_ratio": "16:9",
    }
    bad_csv = tmp_path / "bad.csv"
    bad_csv.write_text("prompt,image,seed\nx,https://e.com/1.jpg,five\n")
    bad = kq(["batch", str(bad_csv)], env)
    assert bad.returncode == 2 and "line 2: seed" in bad.stdout + bad.stderr
    piped = kq(["batch", "-", "--batch-id", "in1"], env, input=LINE.format(i=1) + LINE.format(i=2))
    assert piped.returncode == 0, piped.stderr
    assert redis_client.hget("kq:batch:in1", "total") == "2"


# --- issue 12: byte-order marks, binary files, every problem named, exit codes ------------


def test_a_byte_order_mark_is_accepted_in_jsonl_and_csv(
    redis_client: redis.Redis, redis_url: str, tmp_path: Path
) -> None:
    """Spreadsheet programs start UTF-8 files with a BOM; both formats take it."""
    env = cli_env(redis_url, tmp_path)
    jsonl = tmp_path / "bom.jsonl"
    jsonl.write_bytes(b"\xef\xbb\xbf" + (LINE.format(i=1) + LINE.format(i=2)).encode())
    result = kq(["batch", str(jsonl), "--batch-id", "bom-j"], env)
    assert result.returncode == 0, result.stdout + result.stderr
    csv_path = tmp_path / "bom.csv"
    csv_path.write_bytes(
        b"\xef\xbb\xbfprompt,image,metadata\r\n"
        b'make it blue,https://e.com/1.jpg,"{""order"": 7}"\r\n'
    )
    result = kq(["batch", str(csv_path), "--batch-id", "bom-c"], env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert redis_client.hget("kq:batch:bom-j", "total") == "2"
    (job_id,) = redis_client.lrange("kq:batchjobs:bom-c", 0, -1)
    assert json.loads(redis_client.hget(f"kq:job:{job_id}", "metadata") or "") == {"order": 7}


def test_a_binary_file_gets_one_clear_error(
    redis_client: redis.Redis, redis_url: str, tmp_path: Path
) -> None:
    """An image (or a UTF-16 export) is refused once as "not a text file", not per line."""
    env = cli_env(redis_url, tmp_path)
    picture = tmp_path / "cat.jsonl"
    picture.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 40 + b"\n" * 50)
    result = kq(["batch", str(picture)], env)
    assert result.returncode == 2
    out = result.stdout + result.stderr
    assert "not a text file" in out and out.count("line ") == 0, out
    utf16 = tmp_path / "export.csv"
    utf16.write_bytes("prompt,image\nx,https://e.com/1.jpg\n".encode("utf-16"))
    result = kq(["batch", str(utf16)], env)
    assert result.returncode == 2 and "UTF-16" in result.stdout + result.stderr
    assert redis_client.dbsize() == 0


def test_a_line_with_several_problems_names_them_all(
    redis_client: redis.Redis, redis_url: str, tmp_path: Path
) -> None:
    """Every problem of a line is named, and an unknown field's message lists every
    accepted field (the envelope ones included)."""
    env = cli_env(redis_url, tmp_path)
    path = tmp_path / "bad.jsonl"
    path.write_text(
        LINE.format(i=1)
        + '{"prompt": "", "image": "ftp://x", "seed": 1.5, "colour": "red", "priority": "hi"}\n'
    )
    result = kq(["batch", str(path), "--skip-invalid", "--rejects", str(tmp_path / "r")], env)
    assert result.returncode == 0, result.stdout + result.stderr
    (reject,) = [json.loads(x) for x in (tmp_path / "r").read_text().splitlines()]
    assert reject["line"] == 2
    fields = {e["field"]: e["message"] for e in reject["errors"]}
    assert set(fields) == {"prompt", "image", "seed", "colour", "priority"}
    for name in ("idempotency_key", "priority", "metadata", "aspect_ratio", "guidance_scale"):
        assert name in fields["colour"]
    csv_path = tmp_path / "bad.csv"
    csv_path.write_text("prompt,image,seed,guidance_scale\n,https://e.com/1.jpg,five,lots\n")
    out = " ".join((kq(["batch", str(csv_path)], env).stdout).split())
    for field in ("prompt", "seed", "guidance_scale"):
        assert f"{field}:" in out, out


def finish_batch_jobs(redis_url: str, batch_id: str, states: list[str]) -> None:
    """Move a batch's jobs through the real transitions, as workers would."""
    from worker.domain import JobState
    from worker.store import JobStore

    client = redis.Redis.from_url(redis_url, decode_responses=True)
    store = JobStore(client, result_ttl_s=3600, events_maxlen=1000)
    now = time.time()
    for job_id, state in zip(store.batch_members(batch_id), states, strict=True):
        pid = job_id[::-1]
        store.transition(job_id, JobState.SUBMITTING, now=now, fields={"attempts": 1})
        store.transition(
            job_id,
            JobState.SUBMITTED,
            now=now,
            fields={"prediction_id": pid, "submitted_at": now},
            expect_prediction_id=pid,
        )
        outputs = json.dumps(["https://cdn.example/1.jpg"] if state == "completed" else [])
        store.transition(
            job_id,
            JobState(state),
            now=now + 1,
            fields={"finished_at": now + 1, "outputs": outputs, "resolved_by": "poll"},
        )
    client.close()


def test_wait_exit_codes_tell_failures_apart(
    redis_client: redis.Redis, redis_url: str, tmp_path: Path
) -> None:
    """`kq wait` and `kq batch --wait`: 0 all completed, 3 some failed, 1 not done or
    unknown; documented in --help."""
    env = cli_env(redis_url, tmp_path)
    ok = write_lines(tmp_path / "ok.jsonl", 2)
    assert kq(["batch", str(ok), "--batch-id", "w-ok"], env).returncode == 0
    bad = write_lines(tmp_path / "bad.jsonl", 3)
    assert kq(["batch", str(bad), "--batch-id", "w-bad"], env).returncode == 0
    # Not done yet: the timeout passes.
    assert kq(["wait", "w-ok", "--timeout", "0.5", "--json"], env).returncode == 1
    again = kq(["batch", str(ok), "--batch-id", "w-ok", "--wait", "--timeout", "0.5"], env)
    assert again.returncode == 1
    finish_batch_jobs(redis_url, "w-ok", ["completed", "completed"])
    finish_batch_jobs(redis_url, "w-bad", ["completed", "failed", "completed"])
    assert kq(["wait", "w-ok", "--json"], env).returncode == 0
    assert kq(["wait", "w-bad", "--json"], env).returncode == 3
    rerun = kq(["batch", str(bad), "--batch-id", "w-bad", "--wait", "--json"], env)
    assert rerun.returncode == 3, rerun.stderr
    completed_id, failed_id, _ = redis_client.lrange("kq:batchjobs:w-bad", 0, -1)
    assert kq(["wait", completed_id, "--json"], env).returncode == 0
    assert kq(["wait", failed_id, "--json"], env).returncode == 3
    assert kq(["wait", "nothing-by-that-id", "--timeout", "0.2"], env).returncode == 1
    for command in (["wait", "--help"], ["batch", "--help"], ["enqueue", "--help"]):
        text = kq(command, env).stdout
        assert "exit codes" in text and "some failed" in text, command


def test_job_json_has_nulls_numbers_and_metadata(
    redis_client: redis.Redis, redis_url: str, tmp_path: Path
) -> None:
    """`kq job --json`: times not yet known are null, numbers are numbers, and the
    producer's metadata from `kq enqueue --metadata` is there."""
    env = cli_env(redis_url, tmp_path)
    made = kq(
        ["enqueue", "--prompt", "p", "--image", "https://e.com/a.jpg", "--json",
         "--idempotency-key", "order-5", "--metadata", '{"order": 5}'],
        env,
    )  # fmt: skip
    assert made.returncode == 0, made.stderr
    job_id = json.loads(made.stdout)["job_id"]
    job = json.loads(kq(["job", job_id, "--json"], env).stdout)
    assert job["metadata"] == {"order": 5} and job["idempotency_key"] == "order-5"
    assert job["finished_at"] is None and job["submitted_at"] is None and job["seconds"] is None
    assert type(job["attempts"]) is int and type(job["version"]) is int
    refused = kq(
        ["enqueue", "--prompt", "p", "--image", "https://e.com/a.jpg", "--metadata", "[1]"], env
    )
    assert refused.returncode == 2 and "--metadata" in refused.stderr


def batch_items(path: Path, batch_id: str = "b") -> list[tuple[str, object, str, int]]:
    """(job id, request, key, priority) of each item of a scanned file, in order."""
    from worker.batchfile import BatchFile
    from worker.producer import Item

    with BatchFile(str(path)) as batch:
        assert batch.scan().invalid == 0
        items = list(batch.items(batch_id))
    return [(i.job_id, i.request, i.idempotency_key, i.priority) for i in items if type(i) is Item]


MIXED = (
    LINE.format(i=1)
    + '{"prompt": "with options", "image": "https://e.com/2.jpg", "seed": 7, "priority": 3}\n'
    + "\n# a comment\n"
    + '{"prompt": "own key", "image": "https://e.com/4.jpg", "idempotency_key": "k-4"}\n'
    + '{"prompt": "café ☕", "image": "https://e.com/5.jpg"}\n'
    + LINE.format(i=6)
)


def test_the_scan_is_the_only_pass_over_a_file_within_the_bound(tmp_path: Path) -> None:
    """`items` makes the scanned lines' Items without reading the file again: the same
    Items as a fresh scan, even once the file is gone."""
    path = tmp_path / "mixed.jsonl"
    path.write_text(MIXED)
    expected = batch_items(path)
    # Made-up keys name the line (blank and comment lines count); a line's own is kept.
    prefixes = [key.rsplit(":", 1)[0] for _, _, key, _ in expected]
    assert prefixes == ["b:1", "b:2", "k-4", "b:6", "b:7"]
    assert expected[1][3] == 3 and expected[1][1].seed == 7  # type: ignore[attr-defined]
    from worker.batchfile import BatchFile

    with BatchFile(str(path)) as batch:
        batch.scan()
        path.unlink()
        again = [(i.job_id, i.request, i.idempotency_key, i.priority) for i in batch.items("b")]
    assert again == expected


def test_lines_beyond_the_kept_bound_are_read_and_checked_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With room for only a few lines, the rest are read again, giving the same Items."""
    from worker import batchfile

    path = tmp_path / "mixed.jsonl"
    path.write_text(MIXED + "".join(LINE.format(i=i) for i in range(9, 40)))
    expected = batch_items(path)
    monkeypatch.setattr(batchfile, "KEEP_BYTES", 700)  # the first 2 lines
    assert batch_items(path) == expected
    csv_path = tmp_path / "edits.csv"
    csv_path.write_text(
        "prompt,image,seed\n" + "".join(f"edit {i},https://e.com/{i}.jpg,{i}\n" for i in range(9))
    )
    monkeypatch.setattr(batchfile, "KEEP_BYTES", 10**9)
    expected = batch_items(csv_path)
    monkeypatch.setattr(batchfile, "KEEP_BYTES", 700)
    assert batch_items(csv_path) == expected and len(expected) == 9


def test_a_bad_last_line_beyond_the_kept_bound_enqueues_nothing(
    redis_client: redis.Redis, redis_url: str, tmp_path: Path
) -> None:
    """All-or-nothing holds past the bound: the last line is bad, nothing is written, and
    the error names the line and the field."""
    bad = '{"prompt": "ok", "image": "https://e.com/x.jpg", "seed": "one"}\n'
    path = write_lines(tmp_path / "tail.jsonl", 50, {50: bad})
    code = (
        "import sys; import worker.batchfile as b; b.KEEP_BYTES = 2000\n"
        "from kq.cli import main; sys.exit(main(sys.argv[1:]))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, "batch", str(path), "--batch-id", "tail"],
        env=cli_env(redis_url, tmp_path),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    out = " ".join((result.stdout + result.stderr).split())
    assert "line 50: seed" in out and "nothing was enqueued" in out
    assert redis_client.dbsize() == 0


@pytest.mark.parametrize(
    ("prompt", "image", "field"),
    [
        ("   ", "https://e.com/1.jpg", "prompt"),
        ("\u00a0\u2003", "https://e.com/1.jpg", "prompt"),
        ("a\u0000b", "https://e.com/1.jpg", "prompt"),
        ("lone \ud800", "https://e.com/1.jpg", "prompt"),
        ("x" * 4001, "https://e.com/1.jpg", "prompt"),
        (5, "https://e.com/1.jpg", "prompt"),
        ("ok", "https://e.com/a b.jpg", "image"),
        ("ok", "https://e.com/1.jpg\n", "image"),
        ("ok", "ftp://e.com/1.jpg", "image"),
        ("ok", "https://e.com/" + "x" * 4090, "image"),
        ("ok", None, "image"),
        ("ok", ["https://e.com/1.jpg"], "image"),
        ("ok", "https://[::1]/1.jpg", "image"),
        ("café ☕ ünïcode", "https://e.com/1.jpg", None),
        ("x" * 4000, "https://e.com:8080/p?q=1#f", None),
        ("ok", "https://e.com/ä.jpg", None),
        ("ok", "https://user:pw@e.com/p", None),
    ],
)
def test_the_quick_check_of_the_usual_line_agrees_with_the_full_one(
    tmp_path: Path, prompt: object, image: object, field: str | None
) -> None:
    """A prompt-and-image line takes the quick check; whatever it accepts, the full check
    accepts too, and a refused line names its field."""
    from worker.batchfile import BatchFile
    from worker.items import item_parts

    line = json.dumps({"prompt": prompt, "image": image})
    path = tmp_path / "one.jsonl"
    path.write_text(line + "\n")
    with BatchFile(str(path)) as batch:
        scan = batch.scan()
        items = list(batch.items("b"))
    if field is None:
        assert scan.valid == 1 and len(items) == 1
        assert items[0].request == item_parts(json.loads(line))[0]  # type: ignore[union-attr]
    else:
        assert scan.invalid == 1 and not items
        assert field in {e.field for e in scan.errors[0].errors}


_JSON_LEAVES = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**30), max_value=10**30)
    | st.floats(allow_nan=False)
    | st.text()
)
_JSON_VALUES = st.recursive(
    _JSON_LEAVES,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=12,
)


@settings(max_examples=300, deadline=None)
@given(_JSON_VALUES)
def test_a_line_reads_as_json_reads_it(value: object) -> None:
    """The fast reader of batch lines gives json's value, to the digit and the type."""
    from worker.batchfile import _parse_line

    text = json.dumps(value)
    assert _same(_parse_line(text), json.loads(text))


@pytest.mark.parametrize(
    "text",
    [
        '{"prompt": "a", "image": "https://e.com/a.jpg"}',
        '{"prompt": "a", "seed": 123456789012345678901234567890}',  # past 64 bits
        '{"prompt": "\\ud800", "image": "x"}',  # a lone surrogate, which orjson refuses
        '{"prompt": "a", "prompt": "b"}',  # the last of a repeated name
        '{"a": "1", "b": "2", "a": "3"}',  # ... in the first one's place
        '{"metadata": {"x": NaN}}',
        "[1.5, -0.0, 1e400]",
    ],
)
def test_lines_orjson_reads_otherwise_read_as_json_reads_them(text: str) -> None:
    from worker.batchfile import _parse_line

    assert _same(_parse_line(text), json.loads(text))


@pytest.mark.parametrize("text", ["{", '{"a": 1,}', "[1, 2", "nul", '"\\x"', '{"a": "\tb"}'])
def test_a_line_json_refuses_is_refused_with_json_s_message(text: str) -> None:
    from worker.batchfile import _parse_line

    with pytest.raises(json.JSONDecodeError) as ours:
        _parse_line(text)
    with pytest.raises(json.JSONDecodeError) as theirs:
        json.loads(text)
    assert ours.value.msg == theirs.value.msg


def _same(a: object, b: object) -> bool:
    """Equal with the same types throughout (1 == 1.0 is not enough), NaN equal to NaN."""
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        assert isinstance(b, float)
        return a == b or (a != a and b != b)
    if isinstance(a, dict):
        assert isinstance(b, dict)
        return list(a) == list(b) and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        assert isinstance(b, list)
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return a == b

"""Encoding results: the JSON is what a plain encoder would give, however large the output."""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest
import requests

from runcache.run import encode
from runcache.run.encode import encode_result, json_string_pieces
from runcache.run.runner import RunResult

from conftest import LiveServer


def result(stdout: bytes, stderr: bytes = b"") -> RunResult:
    return RunResult(
        bytearray(stdout),
        bytearray(stderr),
        0,
        False,
        False,
        False,
        0.5,
        "2026-01-01T00:00:00+00:00",
    )


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"plain\n",
        b'quotes " and \\ backslashes',
        b"\x00\x01\x1f controls \x7f",
        "ünïcödé ✓ 😀".encode(),
        b"bad \xff\xfe utf-8",
        b"cut \xe2\x9c",
    ],
)
def test_small_output_matches_a_plain_encoder(raw: bytes) -> None:
    pieces, cut = json_string_pieces(bytearray(raw))
    encoded = json.loads(b"".join(pieces))
    assert cut is False
    assert encoded == raw.decode("utf-8", errors="replace")


def test_large_output_is_encoded_in_slices_without_changing_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(encode, "SLICE_BYTES", 7)
    # Multi-byte characters and escapes straddle slice boundaries.
    raw = ('ab✓"\\\n😀 ' * 50).encode() + b"\xff tail \xe2\x9c"
    pieces, _ = json_string_pieces(bytearray(raw))
    assert len(pieces) > 10
    assert json.loads(b"".join(pieces)) == raw.decode("utf-8", errors="replace")


@pytest.mark.parametrize("slice_bytes", [7, 1 << 20])
def test_the_cap_counts_the_json_sent_not_the_bytes_printed(
    monkeypatch: pytest.MonkeyPatch, slice_bytes: int
) -> None:
    """As reported: NUL bytes escape to six bytes each, so a capped stream of them became
    six times the cap on the wire. Now the JSON is cut at the cap, at a whole escape."""
    monkeypatch.setattr(encode, "SLICE_BYTES", slice_bytes)
    pieces, cut = json_string_pieces(bytearray(b"ab" + b"\x00" * 1000 + "é".encode()), 100)
    joined = b"".join(pieces)
    assert cut is True and len(joined) - 2 <= 100
    assert json.loads(joined) == "ab" + "\x00" * 16  # 2 + 16 * 6 = 98 bytes: whole escapes
    text = ("x" * 90 + "😀é").encode()
    whole, cut = json_string_pieces(bytearray(text), 100)
    assert cut is False and json.loads(b"".join(whole)) == text.decode()


def test_a_cut_stream_is_marked_truncated() -> None:
    decoded = json.loads(encode_result(result(b"\x00" * 600, b"fine"), "k", limit=60))
    assert decoded["stdout"] == "\x00" * 10 and decoded["stdout_truncated"] is True
    assert decoded["stderr"] == "fine" and decoded["stderr_truncated"] is False


def test_encoding_empties_the_raw_buffers() -> None:
    run = result(b"out", b"err")
    encode_result(run, "key")
    assert run.stdout == b"" and run.stderr == b""


def test_encoded_result_has_every_field() -> None:
    decoded = json.loads(encode_result(result(b"out\n", b"err\n"), "k"))
    assert decoded == {
        "stdout": "out\n",
        "stderr": "err\n",
        "return_code": 0,
        "success": True,
        "timed_out": False,
        "partial_results": False,
        "stdout_truncated": False,
        "stderr_truncated": False,
        "execution_time": 0.5,
        "timestamp": "2026-01-01T00:00:00+00:00",
        "cache_key": "k",
        "cancelled": False,
    }


def test_a_live_answer_of_nul_bytes_stays_within_the_cap(
    live_server_factory: Callable[..., LiveServer],
) -> None:
    """As reported: 8 MiB of NULs on each stream became a ~100 MB answer (each NUL is six
    bytes of JSON). With a 64 KiB cap, each stream's JSON is now at most 64 KiB, cut at a
    whole escape and marked truncated, first run and cache hit alike."""
    cap = 65536
    server = live_server_factory("--max-output-bytes", str(cap))
    command = "head -c 8388608 /dev/zero; head -c 8388608 /dev/zero >&2"
    for cached in (False, True):
        answer = requests.post(f"{server.url}/api/command", json={"command": command}, timeout=60)
        assert answer.status_code == 200
        body = answer.json()
        assert body["cached"] is cached
        assert body["stdout_truncated"] is True and body["stderr_truncated"] is True
        assert body["stdout"] == body["stderr"] == "\x00" * (cap // 6)  # whole \u0000 escapes
        summary = {name: value for name, value in body.items() if name not in ("stdout", "stderr")}
        assert len(answer.content) <= 2 * cap + len(json.dumps(summary)) + 64

"""The Server-Sent Events parser, on streams as the format defines them."""

from __future__ import annotations

from runcache.client.sse import Event, parse


def _lines(text: str) -> list[bytes]:
    return text.encode().splitlines(keepends=True)


def test_events_with_kind_id_and_data_lines_joined() -> None:
    stream = "event: stdout\nid: 6:0\ndata: a\ndata: b\n\nevent: result\ndata: {}\n\n"
    assert list(parse(_lines(stream))) == [Event("stdout", "a\nb", "6:0"), Event("result", "{}")]


def test_comments_retry_and_crlf_line_ends_are_read_as_the_format_says() -> None:
    stream = ": keep-alive\r\nretry: 100\r\ndata:no space\r\ndata:  two spaces\r\n\r\n"
    assert list(parse(_lines(stream))) == [Event("message", "no space\n two spaces")]


def test_an_event_without_data_is_not_dispatched_and_an_empty_data_line_is() -> None:
    assert list(parse(_lines("event: ping\n\nevent: blank\ndata:\n\n"))) == [Event("blank", "")]


def test_an_event_cut_before_its_blank_line_is_dropped() -> None:
    assert list(parse(_lines("data: whole\n\ndata: half"))) == [Event("message", "whole")]

"""Recordings: written by the one writer, read back equal; a damaged file is one line or plays up
to the damage; the player steps forward and back through tokens."""

from __future__ import annotations

import gzip
import json
import threading
from pathlib import Path

import pytest

from engine.events import Envelope, Ready, Started, Token
from engine.player import Player, playback_times, token_stops
from engine.recording import Recorder, RecordingError, header, read_recording

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "fake_session.jsonl"


def lines_of(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").splitlines(keepends=True)


def write(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(lines), encoding="utf-8")
    return path


def test_the_fixture_reads_clean():
    rec = read_recording(str(FIXTURE))
    assert rec.notice is None and rec.header["v"] == 1 and rec.header["model"].startswith("fake")
    assert isinstance(rec.envelopes[0].event, Ready)
    assert sum(isinstance(e.event, Token) for e in rec.envelopes) == 8 + 8 + 3 * 8


@pytest.mark.parametrize("name", ["copy.jsonl", "copy.jsonl.gz"])
def test_what_the_recorder_writes_reads_back_equal(tmp_path, name):
    src = read_recording(str(FIXTURE))
    rec = Recorder(str(tmp_path / name), header({"prompt": "x"}, src.envelopes[0].event, "test"))
    rec.write(src.envelopes)
    rec.close()
    back = read_recording(str(tmp_path / name))
    assert back.envelopes == src.envelopes and back.notice is None
    if name.endswith(".gz"):
        assert (tmp_path / name).stat().st_size < FIXTURE.stat().st_size / 2


def test_a_recording_starts_clean(tmp_path):
    """The rest of a run already under way when recording began is left out."""
    src = read_recording(str(FIXTURE)).envelopes
    second = next(i for i, e in enumerate(src) if isinstance(e.event, Started) and e.run == 2)
    rec = Recorder(str(tmp_path / "mid.jsonl"), header())
    rec.write(src[second - 5:])                  # the end of run 1, then everything after
    rec.close()
    back = read_recording(str(tmp_path / "mid.jsonl"))
    assert back.notice is None and {e.run for e in back.envelopes} >= {2, 3}
    assert 1 not in {e.run for e in back.envelopes}


# ------------------------------------------------------------------------- damaged files
@pytest.mark.parametrize("content, message", [
    ("", "is empty"),
    ("hello, I am a text file\n", "not a minillm recording"),
    ('{"type": "token", "v": 1}\n', "not a minillm recording"),
    ('{"type": "header", "v": 2, "format": "minillm-recording"}\n', "schema version 2"),
    ('{"type": "header", "v": 1, "format": "minillm-recording"}\n', "holds no events"),
])
def test_files_that_cannot_play_are_one_line(tmp_path, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(RecordingError, match=message) as err:
        read_recording(str(path))
    assert "\n" not in str(err.value)


def test_missing_and_binary_files(tmp_path):
    with pytest.raises(RecordingError, match="not found"):
        read_recording(str(tmp_path / "nope.jsonl"))
    path = tmp_path / "noise.jsonl"
    path.write_bytes(bytes(range(256)) * 8)
    with pytest.raises(RecordingError, match="not a minillm recording"):
        read_recording(str(path))
    gz = tmp_path / "plain-text-named.gz"
    gz.write_text(FIXTURE.read_text(encoding="utf-8"))
    with pytest.raises(RecordingError, match="not a minillm recording"):
        read_recording(str(gz))


def test_a_truncated_last_line_plays_up_to_it(tmp_path):
    lines = lines_of(FIXTURE)
    path = write(tmp_path / "cut.jsonl", lines[:-1] + [lines[-1][:40]])
    rec = read_recording(str(path))
    assert len(rec.envelopes) == len(lines) - 2
    assert "cut off" in rec.notice and f"line {len(lines)}" in rec.notice


def test_a_truncated_gzip_plays_up_to_it(tmp_path):
    full = gzip.compress(FIXTURE.read_bytes())
    path = tmp_path / "cut.jsonl.gz"
    path.write_bytes(full[: len(full) * 2 // 3])
    rec = read_recording(str(path))
    assert 0 < len(rec.envelopes) < len(lines_of(FIXTURE)) - 1 and rec.notice


def test_a_line_that_is_not_json_or_not_an_event(tmp_path):
    lines = lines_of(FIXTURE)
    rec = read_recording(str(write(tmp_path / "a.jsonl", lines[:10] + ["{oops\n"] + lines[10:])))
    assert len(rec.envelopes) == 9 and "line 11 is not JSON" in rec.notice
    bad = json.loads(lines[10])
    bad["id"] = "seven" if bad["type"] == "token" else bad.pop("type")
    rec = read_recording(str(write(tmp_path / "b.jsonl",
                                   lines[:10] + [json.dumps(bad) + "\n"] + lines[11:])))
    assert len(rec.envelopes) == 9 and "line 11 is not a valid event" in rec.notice


def test_a_huge_line_is_not_read_into_memory(tmp_path):
    lines = lines_of(FIXTURE)
    path = write(tmp_path / "huge.jsonl", lines[:6] + ["[" + "1," * 600_000 + "1]\n"] + lines[6:])
    rec = read_recording(str(path), max_line=2**20)
    assert len(rec.envelopes) == 5 and "longer than 1 MiB" in rec.notice


def _swap(lines: list[str], i: int, j: int) -> list[str]:
    out = list(lines)
    out[i], out[j] = out[j], out[i]
    return out


def test_events_out_of_order(tmp_path):
    lines = lines_of(FIXTURE)
    types = [json.loads(line)["type"] for line in lines]
    first_token = types.index("token")
    # two tokens of one run swapped: time goes backwards
    second = types.index("token", first_token + 1)
    rec = read_recording(str(write(tmp_path / "swap.jsonl", _swap(lines, first_token, second))))
    assert "out of order" in rec.notice and len(rec.envelopes) == first_token - 1
    # a token whose run never started (its Started line lost)
    started = types.index("started")
    rec = read_recording(str(write(tmp_path / "nostart.jsonl",
                                   lines[:started] + lines[started + 1:])))
    assert "before it started" in rec.notice
    # a token after its run finished (same time, so only the order check can see it)
    fin = types.index("finished")
    late = json.loads(lines[max(i for i in range(fin) if types[i] == "token")])
    late["t"] = json.loads(lines[fin])["t"]
    rec = read_recording(str(write(tmp_path / "late.jsonl",
                                   lines[:fin + 1] + [json.dumps(late) + "\n"] + lines[fin + 1:])))
    assert "after it finished" in rec.notice and len(rec.envelopes) == fin


# ------------------------------------------------------------------------- the player
class Collect:
    """A deliver callback that keeps what a consumer would show."""

    def __init__(self):
        self.shown: list[Envelope] = []
        self.restarts = 0
        self.done = threading.Event()

    def __call__(self, envelopes, restart=False):
        if restart:
            self.shown, self.restarts = [], self.restarts + 1
        self.shown.extend(envelopes)


def test_player_steps_tokens_forward_and_back():
    rec = read_recording(str(FIXTURE))
    got = Collect()
    player = Player(rec, playing=False)
    player.start(got)
    try:
        assert [type(e.event) for e in got.shown] == [Ready]       # the model, nothing else
        player.step(3)
        tokens = [e.event for e in got.shown if isinstance(e.event, Token)]
        assert [t.index for t in tokens] == [0, 1, 2] and player.state.token == 3
        at_three = list(got.shown)
        player.step(2)
        player.step(-2)
        assert got.shown == at_three and got.restarts == 1           # the same state again
        player.to_end()
        assert got.shown == rec.envelopes and player.state.at_end
        assert isinstance(got.shown[-1].event, type(rec.envelopes[-1].event))
        player.to_start()
        assert [type(e.event) for e in got.shown] == [Ready] and player.state.token == 0
        stops = token_stops(rec.envelopes)
        # a step ends where the next token, run or race begins (a run's last step takes its
        # Finished along)
        assert all(type(rec.envelopes[s].event).__name__ in
                   ("Token", "Started", "RaceStarted", "RaceFinished") for s in stops[:-1])
        assert len(stops) == player.state.tokens == 40
    finally:
        player.stop()


def test_player_plays_to_the_end_in_order_and_stops():
    rec = read_recording(str(FIXTURE))
    got = Collect()
    player = Player(rec, speed=4.0, tick=0.01)
    done = threading.Event()

    def deliver(envelopes, restart=False):
        got(envelopes, restart)
        if got.shown and got.shown[-1] is rec.envelopes[-1]:
            done.set()
    player.start(deliver)
    try:
        assert done.wait(20), "the replay did not reach the end"
        assert got.shown == rec.envelopes and got.restarts == 0
        assert not player.state.playing and player.state.at_end
    finally:
        player.stop()


def test_play_at_the_end_starts_over_and_pause_holds():
    rec = read_recording(str(FIXTURE))
    got = Collect()
    player = Player(rec, playing=False, tick=3600)     # no ticks: only the controls move it
    player.start(got)
    try:
        player.to_end()
        player.toggle()                                 # at the end: from the start again
        assert player.state.playing and got.restarts == 1
        assert [type(e.event) for e in got.shown] == [Ready]
        player.toggle()
        assert not player.state.playing
    finally:
        player.stop()


def test_speed_steps_and_idle_gaps():
    rec = read_recording(str(FIXTURE))
    player = Player(rec, playing=False)
    assert [player.faster(1), player.faster(1), player.faster(1)] == [2.0, 4.0, 4.0]
    assert [player.faster(-1) for _ in range(4)] == [2.0, 1.0, 0.5, 0.5]
    envs = [Envelope(0, t, Ready("m", "cpu", "f32", 1, 1, 1, 1, 1)) for t in (0, 0.5, 600, 600.2)]
    assert playback_times(envs, max_gap=1.5) == pytest.approx([0, 0.5, 2.0, 2.2])

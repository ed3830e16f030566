"""Step mode (engine/stepping.py): a run that pauses before each token shows the distribution as
the sampling settings shape it and the logit lens, takes exactly the tokens an unstepped run
takes, forks when a token is forced (and says where and why), and stops at once when cancelled.

Tiny random models; commands are queued before the run, or sent from the test while a run
thread waits — always on events, never on sleeps.
"""

from __future__ import annotations

import dataclasses
import queue
import threading
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn

from engine import fast
from engine.config import ConfigError, FastPathConfig, GenerationConfig, SamplingConfig
from engine.decoding import CachedAttention, generate
from engine.attention import get_backend
from engine.events import (Finished, Forked, LogitLens, RaceFinished, Started, StepPoint, Token,
                           from_json, to_json)
from engine.recording import Recorder, header, read_recording
from engine.player import token_stops
from engine.requests import RaceRequest, RunRequest, StepCommand
from engine.sampling import sample, shape
from engine.stepping import lens_of_prefix
from engine.session import Session
from tests.conftest import byte_tokenizer, tiny_model

PROMPT = "The cat"


def session_of(model, **kw) -> Session:
    lm = SimpleNamespace(model=model, tokenizer=byte_tokenizer(), name="tiny", config=model.cfg)
    return Session(lm, **kw)


@pytest.fixture(scope="module")
def qwen():
    """Untied embeddings: a tiny model whose greedy text does not just repeat the prompt."""
    return session_of(tiny_model("qwen2", seed=2))


def cfg(**kw) -> GenerationConfig:
    return GenerationConfig(**{"max_new_tokens": 8, "stop_at_eos": False, "keep_logits": True,
                               **kw})


def events_of(session, request, commands=()):
    """Queue the commands, then drain the run (it never waits for a command that is queued)."""
    for c in commands:
        session.step(c)
    return [e.event for e in session.run(request)]


def of(kind, events):
    return [e for e in events if isinstance(e, kind)]


def nexts(run_id, n):
    return [StepCommand(run_id, "next")] * n


# ------------------------------------------------------------------ the model's residuals
def test_the_model_hands_out_each_layers_residual_and_the_last_one_is_its_prediction():
    model = tiny_model("llama", seed=1)
    x = torch.tensor([[5, 9, 31, 2]])
    attend = CachedAttention(get_backend("naive"))
    plain = model(x, 0, attend, last_only=True)
    residuals = []
    collected = model(x, 0, attend, last_only=True, residuals=residuals)
    assert torch.equal(plain, collected) and len(residuals) == model.cfg.n_layers
    assert residuals[0].shape == (1, 4, model.cfg.dim)
    assert torch.equal(model.readout(residuals[-1][:, -1:]), plain)


# ------------------------------------------------------------------ the distribution shown
SETTINGS = [SamplingConfig(),                                        # greedy
            SamplingConfig(temperature=0.7, top_k=4, seed=1),
            SamplingConfig(temperature=1.3, top_p=0.5, seed=2),
            SamplingConfig(temperature=1.0, min_p=0.2, repetition_penalty=1.3, seed=3)]


@pytest.mark.parametrize("sampling", SETTINGS, ids=["greedy", "top-k", "top-p", "min-p+rep"])
def test_candidates_are_the_softmax_of_the_logits_under_the_sampling_settings(qwen, sampling):
    n = 5
    events = events_of(qwen, RunRequest(PROMPT, cfg(max_new_tokens=n, sampling=sampling), 1,
                                        step=True), nexts(1, n))
    points, tokens = of(StepPoint, events), of(Token, events)
    assert len(points) == n and [p.index for p in points] == list(range(n))
    ids = list(qwen.lm.tokenizer.encode(PROMPT))
    for point, token in zip(points, tokens):
        logits = token.logits.double()
        assert point.chosen == token.id and point.position == token.position
        # what the sampler sees: the repetition penalty on everything so far, then temperature
        seen = torch.tensor(ids) if sampling.repetition_penalty != 1.0 else torch.tensor([])
        pen = logits.clone()
        for i in set(seen.tolist()):
            pen[i] = pen[i] / sampling.repetition_penalty if pen[i] > 0 else \
                pen[i] * sampling.repetition_penalty
        tempered = torch.softmax(pen / (sampling.temperature or 1.0), -1)
        model = torch.softmax(logits, -1)
        ranked = torch.argsort(tempered, descending=True).tolist()
        assert [c.id for c in point.candidates][:10] == ranked[:10]
        kept = set(ranked)
        if sampling.greedy:
            kept = {ranked[0]}
        if sampling.top_k:
            kept = set(ranked[:sampling.top_k])
        if sampling.top_p:
            mass, kept = 0.0, set()
            for i in ranked:
                if mass >= sampling.top_p:
                    break
                kept.add(i)
                mass += float(tempered[i])
        if sampling.min_p:
            kept = {i for i in ranked if tempered[i] >= sampling.min_p * tempered.max()}
        assert point.kept == len(kept)
        total = float(sum(tempered[i] for i in kept))
        for c in point.candidates:
            assert c.model == pytest.approx(float(model[c.id]), abs=1e-6)
            assert c.tempered == pytest.approx(float(tempered[c.id]), abs=1e-6)
            if c.id in kept:
                assert c.cut == "" and c.final == pytest.approx(
                    1.0 if sampling.greedy else float(tempered[c.id]) / total, abs=1e-5)
            else:
                assert c.final == 0.0 and c.cut == ("greedy" if sampling.greedy else
                                                    "top-k" if sampling.top_k else
                                                    "top-p" if sampling.top_p else "min-p")
        ids.append(token.id)


def test_the_view_is_the_sampler_stage_by_stage():
    """shape() walks sample()'s ladder: a draw from its final distribution is the sampler's."""
    logits = torch.randn(256, generator=torch.Generator().manual_seed(0)) * 3
    seen = torch.tensor([3, 17, 17, 40])
    for sampling in SETTINGS[1:]:
        a, b = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
        for _ in range(20):
            shaped = shape(logits, sampling, seen)
            assert sample(logits, sampling, seen, a) == int(torch.multinomial(shaped.final, 1,
                                                                              generator=b))


# ------------------------------------------------------------------ same tokens as unstepped
@pytest.mark.parametrize("strategy", ["kv", "naive", "paged"])
@pytest.mark.parametrize("sampling", [SamplingConfig(), SamplingConfig(temperature=0.9, top_k=20,
                                                                         top_p=0.95, seed=4)],
                         ids=["greedy", "seeded"])
def test_stepping_takes_exactly_the_tokens_of_an_unstepped_run(qwen, strategy, sampling):
    c = cfg(strategy=strategy, sampling=sampling, keep_logits=False)
    plain = events_of(qwen, RunRequest(PROMPT, c, 1))[-1].tokens
    one_by_one = events_of(qwen, RunRequest(PROMPT, c, 2, step=True), nexts(2, 8))
    in_threes = events_of(qwen, RunRequest(PROMPT, c, 3, step=True),
                          [StepCommand(3, "next", count=3)] * 3)
    to_the_end = events_of(qwen, RunRequest(PROMPT, c, 4, step=True), [StepCommand(4, "run")])
    assert one_by_one[-1].tokens == in_threes[-1].tokens == to_the_end[-1].tokens == plain
    assert len(of(StepPoint, one_by_one)) == 8 and len(of(StepPoint, in_threes)) == 3
    assert len(of(StepPoint, to_the_end)) == len(of(LogitLens, to_the_end)) == 1
    assert isinstance(one_by_one[0], Started) and one_by_one[0].step
    assert all(f.reason == "length" for f in (one_by_one[-1], in_threes[-1], to_the_end[-1]))


def test_pause_order_lens_last_so_the_transport_can_flush_before_waiting(qwen):
    events = events_of(qwen, RunRequest(PROMPT, cfg(max_new_tokens=2), 1, step=True), nexts(1, 2))
    names = [type(e).__name__ for e in events]
    assert names[:5] == ["Started", "Prefill", "StepPoint", "LogitLens", "Token"]
    for i, name in enumerate(names):
        if name == "LogitLens":
            assert names[i - 1] == "StepPoint" and names[i + 1] in ("Token", "Forked")


# ------------------------------------------------------------------ forcing: a fork
def test_forcing_a_token_forks_the_run_from_there_and_the_race_says_where_and_why(qwen):
    c = cfg(max_new_tokens=6)
    plain = events_of(qwen, RunRequest(PROMPT, c, 1))[-1].tokens
    forced = (plain[2] + 1) % 256
    commands = nexts(5, 2) + [StepCommand(5, "force", token=forced), StepCommand(5, "run")]
    events = events_of(qwen, RunRequest(PROMPT, c, 5, step=True), commands)
    fork = of(Forked, events)
    ids = qwen.lm.tokenizer.encode(PROMPT)
    assert fork == [Forked(index=2, position=len(ids) + 2, token=forced,
                           text=qwen.lm.tokenizer.token_text(forced), instead=plain[2],
                           instead_text=qwen.lm.tokenizer.token_text(plain[2]))]
    assert events[events.index(fork[0]) + 1] == of(Token, events)[2]     # just before its token
    tokens = events[-1].tokens
    assert tokens[:2] == plain[:2] and tokens[2] == forced
    # "from there": the rest is what the model says after the forced token
    rest = events_of(qwen, RunRequest(ids + list(tokens[:3]), cfg(max_new_tokens=3), 6))
    assert tokens[3:] == rest[-1].tokens and tokens[3:] != plain[3:]
    # forcing the sampler's own choice is no fork
    same = events_of(qwen, RunRequest(PROMPT, c, 7, step=True),
                     [StepCommand(7, "force", token=plain[0]), StepCommand(7, "run")])
    assert not of(Forked, same) and same[-1].tokens == plain

    # The fork, made reproducible as a request, raced against the unforced run.
    base = dataclasses.replace(c, keep_logits=False)
    again = events_of(qwen, RunRequest(PROMPT, base, 8, forces=((2, forced),)))
    assert again[-1].tokens == tokens and of(Forked, again) == fork   # the same fork, unpaused
    envs = list(qwen.race(RaceRequest(9, (RunRequest(PROMPT, base, 10),
                                          RunRequest(PROMPT, base, 11, forces=((2, forced),))))))
    assert envs[0].event.contestants[1].label == "kv/sdpa fork@2"
    result = envs[-1].event
    assert isinstance(result, RaceFinished) and result.identical is False
    row = result.rows[1]
    assert row.first_difference == 2 and row.forced == fork[0] and row.label == "kv/sdpa fork@2"
    assert row.difference == (f"differs from token 2: forced {fork[0].text!r} instead of "
                              f"{fork[0].instead_text!r}")
    assert row.max_logit_delta == 0.0            # the same logits up to the fork: a choice


def test_bad_forces_and_commands_are_refused(qwen):
    with pytest.raises(ConfigError, match="vocabulary has 256"):
        list(qwen.run(RunRequest(PROMPT, cfg(), 1, forces=((0, 999),)), raise_errors=True))
    qwen.step(StepCommand(2, "force", token=999))
    fin = events_of(qwen, RunRequest(PROMPT, cfg(), 2, step=True))[-1]
    assert fin.reason == "error" and "vocabulary" in fin.error
    for bad in (dict(forces=((0, -1),)), dict(forces=((0, 1), (0, 2))),
                dict(forces=((0, 1),), step=True), dict(forces=(("a", 1),))):
        with pytest.raises(ConfigError):
            RunRequest(PROMPT, cfg(), 1, **bad)
    with pytest.raises(ConfigError, match="no step mode"):
        RaceRequest(1, (RunRequest(PROMPT, cfg(), 2, step=True),))
    for bad in (dict(action="jump"), dict(action="force"), dict(count=0), dict(run_id="1")):
        with pytest.raises(ConfigError):
            StepCommand(**{"run_id": 1, **bad})
    req = RunRequest(PROMPT, cfg(), 3, forces=((4, 7), (1, 2)))
    assert req.forces == ((1, 2), (4, 7))
    assert RunRequest.from_json(req.to_json()) == req
    cmd = StepCommand(3, "force", token=5)
    assert StepCommand.from_json(cmd.to_json()) == cmd


# ------------------------------------------------------------------ the logit lens
@pytest.mark.parametrize("family, strategy", [("llama", "kv"), ("qwen2", "naive"),
                                              ("gpt2", "paged")])
def test_the_lens_last_layer_is_the_models_own_prediction(family, strategy):
    """Read from the residuals of the very forward that made the logits (one batched readout
    for all layers: equal up to float32 rounding)."""
    session = session_of(tiny_model(family, seed=3))
    events = events_of(session, RunRequest(PROMPT, cfg(max_new_tokens=4, strategy=strategy), 1,
                                           step=True), nexts(1, 4))
    lenses, tokens = of(LogitLens, events), of(Token, events)
    assert len(lenses) == 4
    ids = session.lm.tokenizer.encode(PROMPT)
    for lens, token in zip(lenses, tokens):
        assert [layer.layer for layer in lens.layers] == list(range(session.lm.config.n_layers))
        assert lens.exact == () and lens.fast == "" and lens.position == token.position
        probs = torch.softmax(token.logits, -1)
        last = lens.layers[-1]
        assert last.top == token.id == int(torch.argmax(token.logits))
        assert last.probs[0] == pytest.approx(float(probs.max()), rel=1e-6)
        assert list(last.probs) == sorted(last.probs, reverse=True) and len(last.ids) == 3
        assert lens.settles_at is not None
        # … and the same lens as a forward of its own over the whole prefix gives
        assert close(lens.layers, lens_of_prefix(session.lm.model, ids, session.lm.tokenizer
                                                 .token_text))
        ids.append(token.id)


def test_a_decode_step_without_python_residuals_gets_the_lens_from_the_prefix(qwen):
    """The C step (and any fast path's own decode step) has no residuals to hand over."""
    from engine.fast.c_step import why_not
    if why_not(qwen.lm.model):
        pytest.skip(f"no C step here: {why_not(qwen.lm.model)}")
    c = cfg(max_new_tokens=3, fast=FastPathConfig(kernel="c"))
    events = events_of(qwen, RunRequest(PROMPT, c, 1, step=True), nexts(1, 3))
    for lens, token in zip(of(LogitLens, events), of(Token, events)):
        assert lens.layers[-1].top == token.id and lens.exact == ()
        assert lens.layers[-1].probs[0] == pytest.approx(
            float(torch.softmax(token.logits, -1).max()), abs=1e-5)


def close(a, b, tol: float = 1e-5) -> bool:
    """Two lenses of the same model on the same prefix, computed by different forwards (the
    run's cached steps, or one over the whole prefix): same tokens, probabilities within tol."""
    return len(a) == len(b) and all(
        x.layer == y.layer and x.ids == y.ids and
        max(abs(p - q) for p, q in zip(x.probs, y.probs)) <= tol for x, y in zip(a, b))


class Nudged(nn.Module):
    """A block that adds a large push towards one token's embedding to the residual stream."""

    def __init__(self, block: nn.Module, direction: torch.Tensor):
        super().__init__()
        self.block, self.direction = block, direction

    def forward(self, x, rope, attend):
        return self.block(x, rope, attend) + self.direction


class NudgedSteps:
    """A "lossy fast path" built to part from the exact model at layer `at`: prepare() gives a
    copy that shares every tensor with the exact model, except that block `at` pushes the
    residual towards token `towards`. Layers before it compute exactly the same numbers."""

    def __init__(self, at: int, towards: int):
        self.at, self.towards = at, towards

    def prepare(self, model, fast_cfg):
        if fast_cfg.weights == "same":
            return model
        variant = fast.shallow_copy(model)
        e = model.tok_emb.weight[self.towards].detach()
        variant.layers[self.at] = Nudged(variant.layers[self.at], 50 * e / e.norm())
        return variant

    def check(self, model, strategy, fast_cfg):
        pass

    def decoder(self, model, cache, fast_cfg, next_pos, record_rows):
        return None


def test_lossy_beside_exact_the_lens_says_the_first_layer_where_top_choices_part():
    model = tiny_model("llama", seed=0, n_layers=4)
    plain = session_of(model)
    exact = of(LogitLens, events_of(plain, RunRequest(PROMPT, cfg(max_new_tokens=1), 1,
                                                      step=True), nexts(1, 1)))[0]
    towards = next(t for t in range(256) if all(layer.top != t for layer in exact.layers))
    session = session_of(model, steps=NudgedSteps(at=2, towards=towards))
    lossy = cfg(max_new_tokens=1, fast=FastPathConfig(weights="int8"))
    lens = of(LogitLens, events_of(session, RunRequest(PROMPT, lossy, 2, step=True),
                                   nexts(2, 1)))[0]
    assert lens.fast == "int8" and close(lens.exact, exact.layers)    # its own forward, naive
    assert lens.layers[:2] == exact.layers[:2]          # the same numbers before the nudge
    assert lens.parts_at == 2 and lens.layers[2].top == towards


def test_int8_weights_step_with_the_exact_model_beside(qwen):
    """The real lossy path (engine/fast's int8 weights): the lens carries the exact model's
    layers on the same prefix, and its last layer is the int8 model's own prediction."""
    plain = of(LogitLens, events_of(qwen, RunRequest(PROMPT, cfg(max_new_tokens=2), 1,
                                                     step=True), nexts(1, 2)))
    c = cfg(max_new_tokens=2, fast=FastPathConfig(weights="int8"))
    events = events_of(qwen, RunRequest(PROMPT, c, 2, step=True), nexts(2, 2))
    lenses, tokens = of(LogitLens, events), of(Token, events)
    for lens, token in zip(lenses, tokens):
        assert lens.fast == "int8" and len(lens.exact) == len(lens.layers) == 2
        assert lens.layers[-1].top == token.id
    assert close(lenses[0].exact, plain[0].layers)     # same prefix, the exact model
    for a, b in zip(lenses[0].layers, lenses[0].exact):
        assert a.probs[0] == pytest.approx(b.probs[0], abs=0.05)     # int8 is close, not equal


# ------------------------------------------------------------------ cancel, closed inbox
def run_in_thread(session, request):
    """Iterate the run on a thread; its events arrive on a queue the test waits on."""
    out: queue.Queue = queue.Queue()

    def work():
        for env in session.run(request):
            out.put(env.event)
        out.put(None)
    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    return out, thread


def wait_for(out: queue.Queue, kind):
    seen = []
    while True:
        event = out.get(timeout=30)
        assert event is not None, f"the run ended before a {kind.__name__}: {seen}"
        seen.append(type(event).__name__)
        if isinstance(event, kind):
            return event


def test_cancel_while_paused_stops_at_once_and_leaves_no_stale_wake_up(qwen):
    out, thread = run_in_thread(qwen, RunRequest(PROMPT, cfg(max_new_tokens=50), 1, step=True))
    wait_for(out, LogitLens)
    qwen.step(StepCommand(1, "next"))
    assert wait_for(out, LogitLens).index == 1
    qwen.cancel()                              # while paused: nothing else will come
    fin = wait_for(out, Finished)
    thread.join(timeout=30)
    assert fin.reason == "cancelled" and len(fin.tokens) == 1 and not thread.is_alive()
    qwen.clear_cancel()
    # The wake-up cancel() left is ignored by the next run (its flag is clear).
    again = events_of(qwen, RunRequest(PROMPT, cfg(max_new_tokens=2), 2, step=True), nexts(2, 2))
    assert again[-1].reason == "length" and len(again[-1].tokens) == 2


def test_a_command_for_another_run_is_ignored_and_a_closed_inbox_stops_the_run(qwen):
    class Closing:
        def __init__(self, items):
            self.items = list(items)

        def get(self):
            return self.items.pop(0) if self.items else None

        def put(self, item):
            self.items.append(item)

    lm = qwen.lm
    session = Session(lm, inbox=Closing([StepCommand(99, "run"), StepCommand(1, "next")]))
    fin = [e.event for e in session.run(RunRequest(PROMPT, cfg(max_new_tokens=5), 1,
                                                   step=True))][-1]
    assert fin.reason == "cancelled" and len(fin.tokens) == 1


# ------------------------------------------------------------------ record and replay
def test_a_step_mode_recording_reads_back_equal_and_replays_stop_at_each_pause(qwen, tmp_path):
    c = cfg(max_new_tokens=4, keep_logits=False)
    for command in nexts(1, 1) + [StepCommand(1, "force", token=65)] + nexts(1, 2):
        qwen.step(command)
    path = tmp_path / "step.jsonl.gz"
    rec = Recorder(str(path), header({"prompt": PROMPT, "config": c.to_dict()}, None, "test"))
    rec.write(qwen.run(RunRequest(PROMPT, c, 1, step=True)))
    rec.close()
    back = read_recording(str(path))
    assert back.notice is None
    events = [e.event for e in back.envelopes]
    assert len(of(StepPoint, events)) == len(of(LogitLens, events)) == 4
    assert len(of(Forked, events)) == 1 and events[-1].tokens[1] == 65
    for event in events:
        assert from_json(to_json(event)) == event
    # Stepping a replay stops after each token *and* the pause before the next one.
    stops = token_stops(back.envelopes)
    for stop in stops[:-1]:
        assert isinstance(back.envelopes[stop - 1].event, LogitLens)


def test_generate_without_a_pause_is_unchanged(qwen):
    """The pause is the only door: no pause, no step events (and the plain loop's tokens)."""
    events = list(generate(qwen.lm.model, qwen.lm.tokenizer, PROMPT, cfg()))
    assert not of(StepPoint, events) and not of(LogitLens, events) and not of(Forked, events)

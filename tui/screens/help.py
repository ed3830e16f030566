"""The help screen: what each pane shows, why it matters, and the keys."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.containers import VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Markdown

HELP = """\
# Mini LLM — what you are looking at

## Token stream
The prompt (dimmed) and the generated text, cut at token boundaries: alternate shades show where
one token ends and the next begins (`k` toggles them), `c` colours each token by how long its step took.
**Why it matters:** a model never sees words, only tokens. Odd splits (" learn"+"ing", a space
glued to the front) explain many quirks, and the colours show which steps were slow.

## KV cache
For `kv`, the preallocated buffer and how much is still unused; for `paged`, the block grid
(used, partly filled, free) of a shared pool; for `naive`, how many positions each step recomputes.
Always: bytes used/reserved, bytes per token, and what grouped-query attention saves.
**Why it matters:** in serving, memory for K/V — not compute — limits how many requests run at
once. Contiguous buffers reserve for the worst case; paging wastes at most one block per sequence.

## Attention
The newest token's attention over every earlier position, one row per head, for one layer
(`[` `]` layer, `{` `}` head, `m` switches to the causal matrix of one head). With the flash
backend, `m` once more shows the online softmax tile by tile: the keys as a strip of tiles
consumed one after another, the running max m and running sum ℓ after each; when a tile brings
a larger max, ℓ is rescaled by e^(m_old − m_new) (`p` pauses, `.` steps).
**Why it matters:** this is what the cache is for — each step reads every previous key. Heads
specialise (some look at the first token, some at the previous one), and flash attention gets
the same numbers without ever writing this matrix out.

## Race
`R` sends the prompt through every strategy/backend, one lane each in the token stream's place:
the text as it streams, tokens done of max, tok/s and TPOT, and ✓ (same tokens as the first
contestant so far) or ✗@i (the first token that differs). The contestants run one after another
— at the same time they would share the cores and each timing would measure the others too.
It ends in a comparison table (`t` shows it again, `l` switches lanes ↔ token stream).
Started with `--endpoint URL` (any OpenAI-compatible server: `serve`, vLLM, llama-server), the
server races last as `remote/HOST:PORT`: its TTFT beside the server's own, its greedy tokens
compared by the engine; the attention and KV panes cannot show a server's insides.
**Why it matters:** a faster strategy or kernel is only an optimisation if its tokens match.

## Fast path
`f` cycles the opt-in speed-ups (shown as `+c`, `+c+int8`… beside strategy/backend): `c` runs the
whole decode step as one C call, `fuse+cols` stacks and re-lays the weights — both exact; `int8`
and `fp16` store the weights in fewer bytes — lossy, and the race shows where the tokens part.
**Why it matters:** a decode step reads every weight once, so its speed is bytes ÷ memory
bandwidth plus overhead; these options remove overhead or bytes, and only the lossy ones may
change the answer (docs/fast_path.md has the numbers).

## Step mode
`n` runs the prompt one token at a time. Before each token the run stops and shows the
candidates: a bar for each after repetition penalty and temperature, then what the draw uses
once top-k / top-p / min-p have cut (cut ones greyed and struck through, with the cut that
removed them) and what the model itself said; ◆ marks the sampler's choice. Beside them the
**logit lens**: each layer's residual stream read through the final norm and the LM head —
what the model would say if it stopped at that layer; the row where the answer settles is
marked. With a lossy fast path (`int8`, `fp16`) the exact model's lens stands beside it, and the
first layer where their top choices part is marked ✗.
Keys: `n` / `space` next token · `N` ten more · `↑` `↓` or `1`…`0` pick a candidate, `enter`
takes it — another one than ◆ *forces* it and the run becomes a **fork** · `e` to the end
without stopping · `x` stop · `R` (after a fork has finished) races the fork against the
unforced run: the verdict says from which token it differs and why · `escape` back to the panes.
**Why it matters:** sampling settings only reshape one distribution per step — here you see
them cut it; and a stepped run takes exactly the tokens of an unstepped one.

## Server view
`B` serves many requests at once — the prompts of `--prompts FILE`, or 16 built-in questions
behind one shared system prompt — with continuous batching on one paged KV pool, and shows it:
requests arriving and waiting, the running batch, preemptions as they happen; the block pool
coloured by request, shared prefix blocks marked ×n (how many sequences hold them), each
sequence's last block with its unused tail ░; one lane per request (· waiting ▶ running ⏸
preempted ✓ done) with its TTFT and TPOT; the aggregate tok/s; and how many of these requests
one contiguous reservation each would have fitted in the same memory. `x` stops the batch,
`escape` goes back (it goes on; `B` shows it again), `↑` `↓` scroll the lanes.
**Why it matters:** a server cannot know how long each answer will be; paged blocks hold only
what was written, and shared prefixes are stored once — so more requests fit, and decoding B
of them per weight read is where a server's throughput comes from.

## Latency
Milliseconds per token against position, this run over the previous ones; TTFT, TPOT, tokens/s
and peak memory. **Why it matters:** `naive` recomputes the whole sequence each step, so its line
climbs; with a cache it stays flat. TTFT is what a user waits for; TPOT is how fast text flows.

## Status bar
Model, device, dtype, strategy/backend, sampling, and whether the last compared runs produced
**identical tokens** (with the largest logit difference). **Why it matters:** an optimisation
that changes the output is a bug, not a speed-up.

## Keys
`/` edit the prompt (`enter` runs it, `escape` leaves it) · `enter` run · `x` stop ·
`s` / `b` / `f` cycle strategy / backend / fast path · `o` sampling settings ·
`R` race (the same prompt through every strategy/backend) · `t` last race table ·
`n` step mode (one token at a time) · `B` server view (many requests at once) ·
`l` race lanes ↔ token stream · `r` record to a file (again: stop) · `S` screenshot (SVG) ·
`T` theme · `C` colour depth (truecolor/256/16) · `ctrl+p` commands · `?` this help · `q` quit.

**Panes own their keys**: `Tab` (or `1` text, `2` attention, `3` KV cache, `4` latency) moves
the focus, and the footer shows the focused pane's keys. `z` zooms the focused pane to the
whole screen (`z` or `escape` again to go back).
Token stream: `k` token shades · `c` colour by latency. Attention: `[` `]` layer · `{` `}` head ·
`m` row / matrix / flash tiles · `p` `.` pause / step the tiles. Latency: `delete` clears the
chart.

## Replay, watch
`python main.py replay FILE` plays a recording (`r`, `--record FILE`, or `run … --record FILE`)
with every pane as it was live — no model, no torch. `space` pause / play · `←` `→` one token
back / forward (the panes show that moment) · `−` `+` speed ×0.5 … ×4 · `home` `end` jump.
`python main.py watch URL` follows a session shared with `--share`, read-only. In both, the
pane keys work on what arrives: pick your own layer, head, view and zoom.

Press `escape` to close.
"""


class HelpScreen(ModalScreen[None]):
    """Why each pane matters. Opens focused on the text, so the arrow and page keys scroll."""

    AUTO_FOCUS = "VerticalScroll"
    BINDINGS = [("escape", "app.pop_screen", "Close"), ("q", "app.pop_screen", "Close"),
                ("question_mark", "app.pop_screen", "Close")]

    DEFAULT_CSS = """
    HelpScreen { align: center middle; }
    HelpScreen > VerticalScroll { width: 90%; max-width: 110; height: 90%;
                                  background: $surface; border: thick $primary; padding: 0 1; }
    """

    def compose(self) -> ComposeResult:
        with VerticalScroll():
            yield Markdown(HELP)

"""The KV-cache pane: what the cache holds, what it costs, what grouped-query attention saves."""

from __future__ import annotations

from rich.style import Style
from rich.text import Text
from textual.reactive import reactive
from textual.widget import Widget

from engine.events import CacheSnapshot, CacheStats, Started
from engine.units import format_bytes

from ..remote import not_exposed, remote_server

SEQ_COLOURS = 6      # sequences in a shared pool cycle through this many theme colours


class KVCachePane(Widget, can_focus=True):
    """A live map of the cache as it fills.

    paged: the block pool, one cell per block, coloured by the sequence that owns it (a pool
    may hold several), its last block drawn half when partly filled, free blocks dotted; kv:
    the preallocated buffer and its unused tail; naive: nothing is cached, and how many
    positions each step recomputes. Zoomed (`z`), the cells grow.
    """

    DEFAULT_CSS = """
    KVCachePane { background: $surface; padding: 0 1; height: 1fr; }
    KVCachePane > .kv--seq0 { color: $primary; }
    KVCachePane > .kv--seq1 { color: $secondary; }
    KVCachePane > .kv--seq2 { color: $accent; }
    KVCachePane > .kv--seq3 { color: $success; }
    KVCachePane > .kv--seq4 { color: $warning; }
    KVCachePane > .kv--seq5 { color: $text; }
    KVCachePane > .kv--free { color: $block-free; }
    KVCachePane > .kv--label { color: $text-muted; }
    KVCachePane > .kv--good { color: $success; }
    KVCachePane > .kv--bad { color: $error; }
    """

    COMPONENT_CLASSES = {*(f"kv--seq{i}" for i in range(SEQ_COLOURS)), "kv--free",
                         "kv--label", "kv--good", "kv--bad"}

    stats: reactive[CacheStats | None] = reactive(None)
    """The newest snapshot of the cache (None: no run yet)."""
    recomputed_total: reactive[int] = reactive(0)
    """naive: positions pushed through the model over every step of the run so far."""
    remote: reactive[str] = reactive("")
    """The server the followed run streams from ("" for a local run): no cache to show."""

    def feed(self, events) -> None:
        """A batch of one run's events: only the newest snapshot is drawn, but naive's
        recomputation adds up over every step."""
        snapshot, recomputed = None, self.recomputed_total
        for ev in events:
            if isinstance(ev, Started):
                snapshot, recomputed = None, 0
                self.stats, self.remote = None, remote_server(ev)
            elif isinstance(ev, CacheSnapshot):
                snapshot = ev.stats
                if snapshot.kind == "none":
                    recomputed += snapshot.recomputed_tokens
        self.recomputed_total = recomputed
        if snapshot is not None:
            self.stats = snapshot

    def clear(self) -> None:
        """No run drawn (a replay starting over)."""
        self.stats, self.recomputed_total, self.remote = None, 0, ""

    # ------------------------------------------------------------------ drawing
    def render(self) -> Text:
        s = self.stats
        label = self.get_component_rich_style("kv--label")
        if self.remote:
            return Text(not_exposed(self.remote, "KV cache"), label)
        if s is None:
            return Text("no run yet — the cache appears here as it fills", label)
        width = max(self.size.width - 2, 10)
        out = Text()
        if s.kind == "paged":
            self._render_pool(out, s, width)
        elif s.kind == "kv":
            used = round(width * s.tokens / max(s.capacity, 1))
            out.append(f"kv · one preallocated buffer of {s.capacity} tokens\n", label)
            out.append("█" * used, self.get_component_rich_style("kv--seq0"))
            out.append("░" * (width - used), self.get_component_rich_style("kv--free"))
            out.append(f"\n{s.tokens} tokens held · {s.capacity - s.tokens} reserved but "
                       f"unused\n", label)
        else:
            self._render_naive(out, s, label)
            return out
        out.append(f"used {format_bytes(s.bytes_used)} of {format_bytes(s.bytes_reserved)} "
                   f"reserved\n")
        out.append(self._per_token(s) + "\n", label)
        if s.bytes_without_gqa > s.bytes_reserved:
            ratio = s.bytes_without_gqa / max(s.bytes_reserved, 1)
            out.append(f"GQA saves {format_bytes(s.bytes_without_gqa - s.bytes_reserved)} "
                       f"({ratio:.0f}× fewer K/V heads than query heads)",
                       self.get_component_rich_style("kv--good"))
        else:
            out.append("no GQA: one K/V head per query head", label)
        return out

    @staticmethod
    def _per_token(s: CacheStats) -> str:
        per_layer = s.bytes_per_token / max(s.n_layers, 1)
        return (f"per token: {format_bytes(s.bytes_per_token)} = K and V in {s.n_layers} layers "
                f"× {format_bytes(per_layer)}")

    def _render_naive(self, out: Text, s: CacheStats, label: Style) -> None:
        out.append("naive · nothing is cached\n", self.get_component_rich_style("kv--bad"))
        out.append(f"this step recomputed K/V for {s.recomputed_tokens} positions; "
                   f"{self.recomputed_total} so far (a cache would have computed each once)\n",
                   label)
        out.append(f"a KV cache would hold {format_bytes(s.bytes_per_token * s.recomputed_tokens)}"
                   f" here\n", label)
        out.append(self._per_token(s), label)

    def _cell_size(self, blocks: int, width: int) -> tuple[int, int]:
        """(columns, rows) per block cell: as large as the pane allows, larger when zoomed,
        always with a gap column so neighbouring blocks stay apart."""
        room = max(self.size.height - 5, 1)          # lines left beside the 5 of text
        for cw, ch in ((12, 4), (8, 2), (6, 2), (4, 1), (3, 1), (2, 1)) if self.is_maximized \
                else ((8, 2), (6, 2), (4, 1), (3, 1), (2, 1)):
            per_row = max(width // cw, 1)
            if -(-blocks // per_row) * ch <= room:
                return cw, ch
        return 1, 1

    def _render_pool(self, out: Text, s: CacheStats, width: int) -> None:
        style = self.get_component_rich_style
        label, free = style("kv--label"), style("kv--free")
        owner, partial = {}, set()
        for k, seq in enumerate(s.sequences):
            for b in seq.blocks:
                owner[b] = k
            if seq.blocks and seq.waste:
                partial.add(seq.blocks[-1])
        pool = "sequence" if len(s.sequences) == 1 else f"{len(s.sequences)} sequences"
        out.append(f"paged · {s.blocks_used} of {s.blocks_total} blocks of {s.block_size} tokens "
                   f"in use · {pool}\n", label)
        cw, ch = self._cell_size(s.blocks_total, width)
        per_row = max(width // cw, 1)
        fill = max(cw - 1, 1)
        for first in range(0, s.blocks_total, per_row):
            for line in range(ch):
                for b in range(first, min(first + per_row, s.blocks_total)):
                    if b in owner:
                        st = style(f"kv--seq{owner[b] % SEQ_COLOURS}")
                        glyph = "▌" * fill if b in partial else "█" * fill
                    else:
                        st, glyph = free, "·" * fill
                    out.append(glyph + (" " if cw > 1 else ""), st)
                out.append("\n")
        # The legend, in the colours it explains.
        for k, seq in enumerate(s.sequences[:SEQ_COLOURS]):
            out.append("██", style(f"kv--seq{k % SEQ_COLOURS}"))
            out.append(f" seq {seq.seq_id} ({seq.tokens} tokens)  ", label)
        out.append("▌▌", style("kv--seq0"))
        out.append(f" partly filled ({s.waste_tokens} slots unused)  ", label)
        out.append("··", free)
        out.append(" free\n", label)

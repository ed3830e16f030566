"""The KV-cache pane: what the cache holds, what it costs, and what grouped-query attention saves."""

from __future__ import annotations

from rich.text import Text
from textual.widget import Widget

from ..messages import CacheUpdated


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


class KVCachePane(Widget):
    """A live map of the cache as it fills.

    paged: the block grid (used blocks coloured by owning sequence, the partly filled last block,
    free blocks); kv: the preallocated buffer and its unused tail; naive: nothing is cached, and
    how many positions each step recomputes.
    """

    DEFAULT_CSS = """
    KVCachePane { background: $surface; padding: 0 1; height: 1fr; }
    KVCachePane > .kv--used { color: $primary; }
    KVCachePane > .kv--seq1 { color: $secondary; }
    KVCachePane > .kv--seq2 { color: $accent; }
    KVCachePane > .kv--partial { color: $warning; }
    KVCachePane > .kv--free { color: $block-free; }
    KVCachePane > .kv--label { color: $text-muted; }
    KVCachePane > .kv--good { color: $success; }
    KVCachePane > .kv--bad { color: $error; }
    """

    COMPONENT_CLASSES = {"kv--used", "kv--seq1", "kv--seq2", "kv--partial", "kv--free",
                         "kv--label", "kv--good", "kv--bad"}

    def __init__(self, *, name=None, id=None, classes=None) -> None:
        super().__init__(name=name, id=id, classes=classes)
        self.stats = None
        self.recomputed_total = 0      # naive: positions pushed through the model, all steps

    def reset(self) -> None:
        self.stats, self.recomputed_total = None, 0
        self.refresh()

    def on_cache_updated(self, message: CacheUpdated) -> None:
        self.show(message.stats)

    def show(self, stats) -> None:
        """Draw this snapshot. (The app keeps `recomputed_total` up to date for naive.)"""
        self.stats = stats
        self.refresh()

    # ------------------------------------------------------------------ drawing
    def render(self) -> Text:
        s = self.stats
        style = self.get_component_rich_style
        if s is None:
            return Text("no run yet — the cache appears here as it fills", style("kv--label"))
        width = max(self.size.width - 2, 10)
        out = Text()
        if s.kind == "paged":
            out.append(f"paged · {s.blocks_used}/{s.blocks_total} blocks of {s.block_size} "
                       f"tokens\n", style("kv--label"))
            owner, partial = {}, set()
            for k, seq in enumerate(s.sequences):
                for b in seq.blocks:
                    owner[b] = k
                if seq.blocks and seq.waste:
                    partial.add(seq.blocks[-1])
            seq_styles = [style("kv--used"), style("kv--seq1"), style("kv--seq2")]
            for b in range(s.blocks_total):
                if b and b % width == 0:
                    out.append("\n")
                if b in partial:
                    out.append("▌", style("kv--partial"))
                elif b in owner:
                    out.append("█", seq_styles[owner[b] % 3])
                else:
                    out.append("·", style("kv--free"))
            waste = s.waste_tokens
            out.append(f"\n█ used  ▌ partly filled ({waste} slots unused)  · free\n",
                       style("kv--label"))
        elif s.kind == "kv":
            used = round(width * s.tokens / max(s.capacity, 1))
            out.append(f"kv · preallocated buffer of {s.capacity} tokens\n", style("kv--label"))
            out.append("█" * used, style("kv--used"))
            out.append("░" * (width - used), style("kv--free"))
            out.append(f"\n{s.tokens} tokens held · {s.capacity - s.tokens} reserved but "
                       f"unused\n", style("kv--label"))
        else:
            out.append("naive · nothing is cached\n", style("kv--bad"))
            out.append(f"this step recomputed K/V for {s.recomputed_tokens} positions; "
                       f"{self.recomputed_total} so far (a cache would have computed "
                       f"each once)\n", style("kv--label"))
            per_token = s.bytes_per_token
            out.append(f"a KV cache would hold {human_bytes(per_token * s.recomputed_tokens)} "
                       f"here\n", style("kv--label"))
            out.append(f"bytes per token: {human_bytes(per_token)} "
                       f"(2 × {s.n_layers} layers × kv_heads × head_dim × dtype)",
                       style("kv--label"))
            return out
        out.append(f"used {human_bytes(s.bytes_used)} / reserved {human_bytes(s.bytes_reserved)}"
                   f" · {human_bytes(s.bytes_per_token)} per token "
                   f"({human_bytes(s.bytes_per_layer_used)} per layer)\n")
        if s.bytes_without_gqa > s.bytes_reserved:
            ratio = s.bytes_without_gqa / max(s.bytes_reserved, 1)
            out.append(f"GQA saves {human_bytes(s.bytes_without_gqa - s.bytes_reserved)} "
                       f"({ratio:.0f}× fewer K/V heads than query heads)", style("kv--good"))
        else:
            out.append("no GQA: one K/V head per query head", style("kv--label"))
        return out

"""Regenerate the README picture: the real app on the embedded model, after one run.

    python -m tui.screenshot [docs/screenshot.svg] [--tokens 30] [--strategy paged]
"""

from __future__ import annotations

import argparse
import asyncio


async def shoot(path: str, tokens: int, strategy: str, prompt: str) -> str:
    from engine.events import Finished
    from tui.app import MiniLLMApp
    from tui.messages import EngineEvents
    from tui.settings import Settings
    from tui.widgets.latency import LatencyPane
    app = MiniLLMApp(Settings(max_new_tokens=tokens, strategy=strategy, prompt=prompt),
                     color_depth="truecolor")
    done: list = []                       # the run's Finished event, once drawn

    def hook(message) -> None:
        if isinstance(message, EngineEvents):
            done.extend(e.event for e in message.envelopes if isinstance(e.event, Finished))

    async with app.run_test(size=(140, 42), message_hook=hook) as pilot:
        while app.info is None:
            await asyncio.sleep(0.2)
        await pilot.press("enter")
        while not done:
            await asyncio.sleep(0.2)
        await pilot.pause(0.5)
        app.query_one(LatencyPane).redraw()
        app.clear_notifications()
        await pilot.pause(0.3)
        app.save_screenshot(path)
        return done[-1].text


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("path", nargs="?", default="docs/screenshot.svg")
    p.add_argument("--tokens", type=int, default=30)
    p.add_argument("--strategy", default="paged")
    p.add_argument("--prompt", default="The three most important ideas in deep learning are")
    a = p.parse_args()
    print(asyncio.run(shoot(a.path, a.tokens, a.strategy, a.prompt)))


if __name__ == "__main__":     # the engine process is spawned: it re-imports this module
    main()

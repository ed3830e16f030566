"""Regenerate the README picture: the real app on the embedded model, after one run — or, with
--step, the step screen paused a few tokens into a sampled run.

    python -m tui.screenshot [docs/screenshot.svg] [--tokens 30] [--strategy paged]
    python -m tui.screenshot docs/step.svg --step
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


async def shoot_step(path: str, prompt: str, steps: int = 3) -> str:
    from tui.app import MiniLLMApp, Settings
    from tui.screens.step import StepScreen
    app = MiniLLMApp(Settings(prompt=prompt, max_new_tokens=30,
                              sampling=dict(temperature=0.8, top_k=8, top_p=0.9, seed=3)),
                     color_depth="truecolor")
    async with app.run_test(size=(110, 32)) as pilot:
        while app.info is None:
            await asyncio.sleep(0.2)
        await pilot.press("n")
        for i in range(steps + 1):
            while not (isinstance(app.screen, StepScreen) and app.screen.paused
                       and app.screen.point.index == i):
                await asyncio.sleep(0.1)
            if i < steps:
                await pilot.press("n")
        await pilot.press("down")
        app.clear_notifications()
        await pilot.pause(0.3)
        app.save_screenshot(path)
        return "".join(app.screen.pieces)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("path", nargs="?", default="docs/screenshot.svg")
    p.add_argument("--tokens", type=int, default=30)
    p.add_argument("--strategy", default="paged")
    p.add_argument("--prompt", default="The three most important ideas in deep learning are")
    p.add_argument("--step", action="store_true", help="the step screen instead")
    a = p.parse_args()
    if a.step:
        print(asyncio.run(shoot_step(a.path, a.prompt)))
        return
    print(asyncio.run(shoot(a.path, a.tokens, a.strategy, a.prompt)))


if __name__ == "__main__":     # the engine process is spawned: it re-imports this module
    main()

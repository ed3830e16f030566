"""The command line: above the engine (engine/), the server (serve/) and the app (tui/).

It parses, turns flags into the engine's configs, dispatches, and turns every way of failing into
one line and an exit status. Nothing below imports it: the engine knows no flags.

    main.py      main(): parse, dispatch, errors as one line and an exit status; the app commands
    parser.py    the whole parser: every command and its flags
    flags.py     the flags several commands share (model, generation, look) and flags → configs
    run.py       `run`: a completion (or its events) streamed to stdout, a local or remote model
    batch.py     `batch --prompts FILE`: many requests through the batching engine
    bench.py     `bench`: its flags; the measuring is engine/bench/
    terminal.py  stderr lines, the loading progress bar, closed or broken standard streams

`serve`'s flags and command live with the server (serve/cli.py), built from the same flags.
This file imports nothing, so that `from cli.flags import …` (serve/cli.py) loads only that.
"""

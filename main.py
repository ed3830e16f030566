"""Mini LLM Inference Engine — `python main.py` starts the app; sub-commands run headless.

    python main.py                     the Textual app on the embedded model
    python main.py run PROMPT          stream a completion to stdout (--json for events)
    python main.py bench               the standard experiment and sweeps
"""

from engine.cli import main

if __name__ == "__main__":
    raise SystemExit(main())

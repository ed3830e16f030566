"""Mini LLM Inference Engine — `python main.py` starts the app; sub-commands run headless.

    python main.py                     the Textual app on the embedded model
    python main.py run PROMPT          stream a completion to stdout (--json for events)
    python main.py bench               the standard experiment and sweeps
"""

import sys

if __name__ == "__main__":
    try:
        from cli.main import main        # a command may import torch: Ctrl+C may land here
        code = main()
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        code = 130
    raise SystemExit(code)

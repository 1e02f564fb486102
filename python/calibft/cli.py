"""The ``calibft`` command: ``calibft train ...`` and ``calibft eval ...``.

User mistakes (ValueError) print one line on stderr and exit with code 2, without a traceback.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable, Sequence

USAGE = """usage: calibft {train,eval} ...

  train   calibration fine-tuning of a causal LM (calibft train --help)
  eval    structured-sampling evaluation of base model and adapters (calibft eval --help)
"""


def _train(argv: Sequence[str]) -> int:
    from calibft.train import main

    return main(argv)


def _eval(argv: Sequence[str]) -> int:
    from calibft.evaluate import main

    return main(argv)


COMMANDS: dict[str, Callable[[Sequence[str]], int]] = {"train": _train, "eval": _eval}


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(USAGE, file=sys.stdout if args else sys.stderr, end="")
        return 0 if args else 2
    command, rest = args[0], args[1:]
    if command not in COMMANDS:
        print(f"calibft: error: unknown command {command!r}; choose train or eval", file=sys.stderr)
        return 2
    # Our own messages at INFO (or $CALIBFT_LOG_LEVEL); libraries stay at WARNING.
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    logging.getLogger("calibft").setLevel(os.environ.get("CALIBFT_LOG_LEVEL", "INFO").upper())
    try:
        return COMMANDS[command](rest)
    except ValueError as err:
        print(f"calibft {command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            f"calibft {command}: interrupted; completed checkpoints are intact (continue with --resume)",
            file=sys.stderr,
        )
        return 130


if __name__ == "__main__":
    sys.exit(main())

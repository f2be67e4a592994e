"""tm4's CLI with the window between a kernel change and the store's COMMIT widened, as
a slow disk would (200-800 ms): SIGKILL tests then land in that window often, not once in 40."""

from __future__ import annotations

import random
import time

from tm4.ops import engine

_push = engine.Core._push


def _slow_push(self: engine.Core, changes: engine.SetChanges) -> None:
    _push(self, changes)
    time.sleep(random.uniform(0.2, 0.8))


engine.Core._push = _slow_push  # type: ignore[method-assign]

if __name__ == "__main__":
    from tm4.cli import main

    main()

"""`spanvm operator` with a fault injected through the reconciler's hook: the process exits
(status 3, no clean-up) right after its Nth fragment create. For the restart tests only: the
product has no such switch. Usage: python tests/faulty_operator.py N <spanvm operator args>."""

import argparse
import os
import sys

from spanvm.commands.daemons import operator, start_operator
from spanvm.controller.reconcile import Hooks


def main() -> int:
    after = int(sys.argv[1])

    def crash(created: int) -> None:
        if created >= after:
            print(f"fault injection: exiting after {created} fragment creates", flush=True)
            os._exit(3)

    options = operator.make_context("operator", sys.argv[3:]).params  # after "operator"
    start_operator(argparse.Namespace(**options), hooks=Hooks(after_fragment_create=crash))
    return 0


if __name__ == "__main__":
    sys.exit(main())

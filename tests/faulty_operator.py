"""`spanvm operator` with a fault injected through the reconciler's hook: the process exits
(status 3, no clean-up) right after its Nth fragment create. For the restart tests only: the
product has no such switch. Usage: python tests/faulty_operator.py N <spanvm operator args>."""

import os
import sys

from spanvm import cli
from spanvm.controller.reconcile import Hooks


def main() -> int:
    after = int(sys.argv[1])

    def crash(created: int) -> None:
        if created >= after:
            print(f"fault injection: exiting after {created} fragment creates", flush=True)
            os._exit(3)

    args = cli.build_parser().parse_args(sys.argv[2:])
    return cli.cmd_operator(args, hooks=Hooks(after_fragment_create=crash))


if __name__ == "__main__":
    sys.exit(main())

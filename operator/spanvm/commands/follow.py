"""Following a guest's console from what the API reports (`spanvm console --follow`).

Fragment 0's agent publishes the end of the console (`consoleTail`, about 2 KiB from a line
boundary) and how many bytes the guest has written in all (`consoleBytes`); the operator
copies both into the SpanningVM's status. A follower that remembers how many bytes it has
printed prints exactly the new ones, and says how many it missed when the guest wrote more
than a tail between two looks. Without `consoleBytes` (an older agent) the new text is what
follows the longest overlap of the previous tail with the new one.
"""

from dataclasses import dataclass


@dataclass
class Follower:
    """What has been printed so far; `update` gives the text to print next."""

    printed: int | None = None  # bytes of the console printed (None: nothing seen yet)
    tail: str = ""

    def update(self, tail: str, total: int | None) -> str:
        """The text to print for a newly reported (tail, consoleBytes)."""
        previous, self.tail = self.tail, tail
        if total is None:
            return _after_overlap(previous, tail)
        data = tail.encode()
        if self.printed is None or total < self.printed:  # first look, or a restarted guest
            head = "" if self.printed is None else "\n--- the guest restarted ---\n"
            self.printed = total
            return head + tail
        new = total - self.printed
        self.printed = total
        if new <= 0:
            return ""
        if new > len(data):
            return f"\n[... {new - len(data)} bytes not shown ...]\n" + tail
        return data[-new:].decode(errors="replace")


def _after_overlap(previous: str, tail: str) -> str:
    """The part of `tail` after its longest prefix that ends `previous`."""
    for size in range(min(len(previous), len(tail)), 0, -1):
        if previous.endswith(tail[:size]):
            return tail[size:]
    return tail

"""The troubleshooting guide keeps up with the code: every reason the scheduler can give for
excluding a node and every SpanningVM phase has a row saying what to do, and every alert in
the chart links to a section that exists."""

import re
from typing import get_args

import yaml

from conftest import REPO
from spanvm.api.spanningvm import Phase

GUIDE = (REPO / "docs" / "troubleshooting.md").read_text()


def test_every_scheduler_reason_is_explained() -> None:
    source = (REPO / "operator" / "spanvm" / "scheduler" / "placement.py").read_text()
    reasons = set(re.findall(r'rejected\["([^"]+)"\]', source))
    assert len(reasons) >= 6  # the parse found them
    missing = [r for r in reasons if f"| `{r}` |" not in GUIDE]
    assert missing == []


def test_every_phase_is_explained() -> None:
    missing = [p for p in get_args(Phase) if not re.search(rf"^\| `{p}`", GUIDE, re.MULTILINE)]
    assert missing == []


def test_every_alert_links_to_a_section_of_the_guide() -> None:
    rules = yaml.safe_load((REPO / "charts" / "spanvm" / "files" / "alerts.yaml").read_text())
    anchors = set(re.findall(r'<a id="([^"]+)">', GUIDE)) | set(
        re.findall(r"^## .*\{#([^}]+)\}", GUIDE, re.MULTILINE)
    )
    for rule in rules["groups"][0]["rules"]:
        link = re.search(r"troubleshooting\.md#([\w-]+)", rule["annotations"]["description"])
        assert link is not None, rule["alert"]
        assert link.group(1) in anchors, (rule["alert"], link.group(1))

"""The troubleshooting guide keeps up with the code: every reason the scheduler can give for
excluding a node and every SpanningVM phase has a row saying what to do, and every alert in
the chart links to a section that exists."""

import re

import yaml

from conftest import REPO
from spanvm.api.phases import VMPhase

GUIDE = (REPO / "docs" / "troubleshooting.md").read_text()


def test_every_scheduler_reason_is_explained() -> None:
    source = (REPO / "operator" / "spanvm" / "scheduler" / "placement.py").read_text()
    table = re.search(r"^_REASONS = \((.*?)^\)", source, re.MULTILINE | re.DOTALL)
    assert table is not None  # the scheduler's table of exclusion reasons
    reasons = set(re.findall(r'^\s*"([^"]+)",$', table.group(1), re.MULTILINE))
    assert len(reasons) >= 6  # the parse found them
    missing = [r for r in reasons if f"| `{r}` |" not in GUIDE]
    assert missing == []


def test_every_phase_is_explained() -> None:
    missing = [
        p
        for p in (phase.value for phase in VMPhase)
        if not re.search(rf"^\| `{p}`", GUIDE, re.MULTILINE)
    ]
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

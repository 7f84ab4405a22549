"""The payload build: flat images with manifests, cached by source hash."""

import shutil
from pathlib import Path

import pytest

from spanvm.payloads import build
from spanvm.payloads.catalog import PAYLOAD_NAMES


@pytest.fixture
def private_build(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    sources = tmp_path / "src"
    shutil.copytree(build.SOURCE_DIR, sources)
    monkeypatch.setattr(build, "SOURCE_DIR", sources)
    monkeypatch.setenv("SPANVM_CACHE_DIR", str(tmp_path / "cache"))
    return sources


def test_every_payload_builds_a_flat_image(private_build: Path) -> None:
    for name in PAYLOAD_NAMES:
        image = build.payload_image(name)
        data = image.path.read_bytes()
        assert image.entry == image.load_address == build.LOAD_ADDRESS
        assert 0 < len(data) <= image.end - image.load_address
        assert image.symbolize(image.entry) == "_start+0x0"


def test_build_is_cached_and_rebuilt_when_a_source_changes(private_build: Path) -> None:
    first = build.build_all()
    stamp = (first / "hello.bin").stat().st_mtime_ns
    assert build.build_all() == first
    assert (first / "hello.bin").stat().st_mtime_ns == stamp
    hello = private_build / "hello.c"
    hello.write_text(hello.read_text().replace('"hello from vCPU "', '"hi from vCPU "'))
    second = build.build_all()
    assert second != first and b"hi from vCPU" in (second / "hello.bin").read_bytes()


def test_compiler_errors_are_reported(private_build: Path) -> None:
    (private_build / "hello.c").write_text("int payload_main(void) { return undefined_name; }\n")
    with pytest.raises(build.PayloadBuildError, match="undefined_name"):
        build.build_all()

"""`spanvm run` with a boot source other than a payload: Multiboot kernels and their modules,
and the one-line refusals of inconsistent options and unusable files."""

from pathlib import Path

import pytest

from spanvm_cli import spanvm

pytestmark = pytest.mark.kvm


def test_multiboot_kernel_runs_with_its_module_and_exit_code(
    kut_dummy: Path, tmp_path: Path
) -> None:
    env = tmp_path / "env"
    env.write_text("NR_CPUS=2\nTEST_DEVICE=0\n")
    result = spanvm("run", "--multiboot", str(kut_dummy), "--module", str(env), "--vcpus", "2")
    assert result.returncode == 0, result.stderr
    assert "smp: waiting for 1 APs" in result.stdout and "Dummy Hello World!" in result.stdout


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["hello", "--multiboot", "K"], "give a payload or --multiboot, not both"),
        (
            ["--module", "M", "hello"],
            "--module and --cmdline need a kernel (--kernel or --multiboot)",
        ),
        ([], "give a payload name or file, --kernel KERNEL or --multiboot KERNEL"),
        (["--kernel", "K", "--fragments", "2", "--vcpus", "2"], "runs in one process"),
    ],
    ids=["both", "module-without-kernel", "nothing", "fragments"],
)
def test_inconsistent_boot_options_are_usage_errors(args: list[str], needle: str) -> None:
    result = spanvm("run", *args)
    assert result.returncode == 2, result.stderr
    assert needle in result.stderr and "Traceback" not in result.stderr


def test_unusable_kernel_is_refused_naming_it(tmp_path: Path) -> None:
    kernel = tmp_path / "kernel.flat"
    kernel.write_bytes(b"not a kernel" * 100)
    result = spanvm("run", "--multiboot", str(kernel))
    assert result.returncode == 2  # bad arguments, like a payload path that is no file
    assert f"multiboot kernel {kernel}: no Multiboot header" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("fragments", ["1", "2"])
@pytest.mark.parametrize("option", ["--multiboot", "--module"])
def test_missing_boot_file_is_a_usage_error_naming_it(
    kut_dummy: Path, tmp_path: Path, option: str, fragments: str
) -> None:
    missing = tmp_path / "nowhere" / "file"
    kernel = (
        ["--multiboot", str(missing)]
        if option == "--multiboot"
        else ["--multiboot", str(kut_dummy), "--module", str(missing)]
    )
    result = spanvm("run", *kernel, "--vcpus", "2", "--fragments", fragments)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and str(missing) in lines[0] and "No such file" in lines[0], lines

"""ACPI and MP tables: parsed back by this file's own readers, and by ACPICA's iasl/acpiexec.

The readers below follow the specs' byte offsets directly (ACPI 6.5 chapter 5, MP spec 1.4
chapter 4) and share no code with spanvm.vmm.acpi / spanvm.vmm.mptable.
"""

import re
import shutil
import struct
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from spanvm.vmm.acpi import build_acpi
from spanvm.vmm.mptable import build_mptable
from spanvm.vmm.platform_shape import NumaNode, PlatformShape, shape_for_fragments

BASE = 0xE0000
MP_BASE = 0xF0000
GIB = 1 << 30

TWO = shape_for_fragments([2, 2], [[(0, 2 * GIB)], [(2 * GIB, 3 * GIB), (4 * GIB, 5 * GIB)]])
THREE = shape_for_fragments(
    [1, 3, 2], [[(0, GIB)], [(GIB, 2 * GIB)], [(2 * GIB, 3 * GIB), (4 * GIB, 6 * GIB)]]
)
# 300 vCPUs: APIC ids 255..299 need x2APIC entries in the MADT and the SRAT.
LARGE = shape_for_fragments([150, 150], [[(0, GIB)], [(GIB, 2 * GIB)]])
# With the PM1 register block declared (the VMM emulating ports 0x600-0x605).
THREE_PM1 = PlatformShape(nodes=THREE.nodes, pm1_port=0x600)


@dataclass
class Table:
    signature: str
    address: int
    raw: bytes

    @property
    def body(self) -> bytes:
        return self.raw[36:]


def _sum(data: bytes) -> int:
    return sum(data) % 256


def read_table(blob: bytes, address: int) -> Table:
    offset = address - BASE
    assert 0 <= offset < len(blob), f"table at {address:#x} is outside the blob"
    assert address % 16 == 0, f"table at {address:#x} is not 16-byte aligned"
    length = struct.unpack_from("<I", blob, offset + 4)[0]
    raw = blob[offset : offset + length]
    assert len(raw) == length
    assert _sum(raw) == 0, f"checksum of {raw[:4]!r}"
    return Table(raw[:4].decode(), address, raw)


def read_all(shape: PlatformShape) -> dict[str, Table]:
    """Walk RSDP -> XSDT -> tables -> FADT's DSDT, checking each checksum on the way."""
    acpi = build_acpi(shape, BASE)
    blob = acpi.blob
    assert acpi.rsdp_address == BASE
    rsdp = blob[:36]
    assert rsdp[:8] == b"RSD PTR "
    assert _sum(rsdp[:20]) == 0 and _sum(rsdp) == 0
    assert rsdp[9:15] == b"SPANVM"
    revision, rsdt, length, xsdt_address = struct.unpack_from("<BIIQ", rsdp, 15)
    assert (revision, rsdt, length) == (2, 0, 36)
    xsdt = read_table(blob, xsdt_address)
    assert xsdt.signature == "XSDT"
    tables = {"XSDT": xsdt}
    for (address,) in struct.iter_unpack("<Q", xsdt.body):
        table = read_table(blob, address)
        tables[table.signature] = table
    fadt = tables["FACP"]
    dsdt32 = struct.unpack_from("<I", fadt.raw, 40)[0]
    x_dsdt = struct.unpack_from("<Q", fadt.raw, 140)[0]
    assert dsdt32 == x_dsdt
    tables["DSDT"] = read_table(blob, x_dsdt)
    for table in tables.values():
        assert table.raw[10:16] == b"SPANVM"
    assert sorted(tables) == ["APIC", "DSDT", "FACP", "SLIT", "SRAT", "XSDT"]
    assert {s: t.address for s, t in tables.items()} == {
        s: a for s, a in acpi.addresses.items() if s != "RSD PTR "
    }
    return tables


def madt_entries(madt: Table) -> list[tuple[int, bytes]]:
    entries = []
    offset = 44  # header + local APIC address + flags
    while offset < len(madt.raw):
        kind, length = madt.raw[offset], madt.raw[offset + 1]
        assert length > 0
        entries.append((kind, madt.raw[offset : offset + length]))
        offset += length
    assert offset == len(madt.raw)
    return entries


def srat_entries(srat: Table) -> list[tuple[int, bytes]]:
    assert struct.unpack_from("<I", srat.raw, 36)[0] == 1  # reserved, must be 1
    entries = []
    offset = 48
    while offset < len(srat.raw):
        kind, length = srat.raw[offset], srat.raw[offset + 1]
        entries.append((kind, srat.raw[offset : offset + length]))
        offset += length
    assert offset == len(srat.raw)
    return entries


@pytest.mark.parametrize("shape", [TWO, THREE, LARGE], ids=["2-fragments", "3-fragments", "x2apic"])
def test_madt_lists_every_vcpu_of_the_vm(shape: PlatformShape) -> None:
    madt = read_all(shape)["APIC"]
    assert struct.unpack_from("<II", madt.raw, 36) == (0xFEE00000, 1)
    entries = madt_entries(madt)
    cpus = []
    for kind, raw in entries:
        if kind == 0:
            uid, apic_id, flags = struct.unpack_from("<BBI", raw, 2)
            assert apic_id < 255
            cpus.append((uid, apic_id, flags))
        elif kind == 9:
            apic_id, flags, uid = struct.unpack_from("<III", raw, 4)
            assert apic_id >= 255
            cpus.append((uid, apic_id, flags))
    every = [a for node in shape.nodes for a in node.apic_ids]
    assert cpus == [(a, a, 1) for a in sorted(every)]
    ioapics = [struct.unpack_from("<BBII", raw, 2) for kind, raw in entries if kind == 1]
    assert ioapics == [(0, 0, 0xFEC00000, 0)]
    overrides = [struct.unpack_from("<BBIH", raw, 2) for kind, raw in entries if kind == 2]
    assert overrides == [(0, 0, 2, 0), (0, 9, 9, 0xD)]
    nmis = [struct.unpack_from("<BHB", raw, 2) for kind, raw in entries if kind == 4]
    assert nmis == [(0xFF, 0x5, 1)]
    x2nmis = [struct.unpack_from("<HIB", raw, 2) for kind, raw in entries if kind == 0xA]
    assert x2nmis == ([(0x5, 0xFFFFFFFF, 1)] if max(every) >= 255 else [])


@pytest.mark.parametrize("shape", [TWO, THREE, LARGE], ids=["2-fragments", "3-fragments", "x2apic"])
def test_srat_maps_each_fragments_vcpus_and_memory_to_its_node(shape: PlatformShape) -> None:
    cpu_domain: dict[int, int] = {}
    memory: list[tuple[int, int, int]] = []
    for kind, raw in srat_entries(read_all(shape)["SRAT"]):
        if kind == 0:
            low, apic_id, flags, _eid = struct.unpack_from("<BBIB", raw, 2)
            high = int.from_bytes(raw[9:12], "little")
            assert flags == 1 and len(raw) == 16
            cpu_domain[apic_id] = low | high << 8
        elif kind == 2:
            domain, apic_id, flags = struct.unpack_from("<III", raw, 4)
            assert flags == 1 and len(raw) == 24 and apic_id >= 255
            cpu_domain[apic_id] = domain
        else:
            assert kind == 1 and len(raw) == 40
            domain, start, length = struct.unpack_from("<IxxQQ", raw, 2)
            assert struct.unpack_from("<I", raw, 28)[0] == 1  # enabled, not hot-pluggable
            memory.append((domain, start, start + length))
    assert cpu_domain == {a: i for i, node in enumerate(shape.nodes) for a in node.apic_ids}
    expected = [(i, s, e) for i, node in enumerate(shape.nodes) for s, e in node.memory]
    assert sorted(memory) == sorted(expected)


@pytest.mark.parametrize("shape", [TWO, THREE], ids=["2-fragments", "3-fragments"])
def test_slit_is_10_local_20_remote(shape: PlatformShape) -> None:
    slit = read_all(shape)["SLIT"]
    count = struct.unpack_from("<Q", slit.raw, 36)[0]
    assert count == len(shape.nodes)
    matrix = slit.raw[44:]
    assert len(matrix) == count * count
    for i in range(count):
        for j in range(count):
            assert matrix[i * count + j] == (10 if i == j else 20)


def test_fadt_is_a_legacy_pc_with_sci_9_and_no_8042_or_vga() -> None:
    tables = read_all(TWO)
    fadt = tables["FACP"].raw
    assert len(fadt) == 276 and fadt[8] == 6  # revision 6
    assert struct.unpack_from("<H", fadt, 46)[0] == 9  # SCI_INT
    boot_arch = struct.unpack_from("<H", fadt, 109)[0]
    assert boot_arch & 0b10 == 0  # no 8042
    assert boot_arch & 0b100  # VGA not present
    assert boot_arch & 0b100000  # no CMOS RTC (the default shape has none)
    flags = struct.unpack_from("<I", fadt, 112)[0]
    assert not flags & (1 << 20)  # not hardware-reduced
    assert tables["DSDT"].raw[8] == 2 and len(tables["DSDT"].raw) == 36  # header only


def test_rtc_flag_follows_the_shape() -> None:
    shape = PlatformShape(nodes=TWO.nodes, cmos_rtc=True)
    fadt = read_all(shape)["FACP"].raw
    assert struct.unpack_from("<H", fadt, 109)[0] & 0b100000 == 0


def test_acpi_base_must_be_16_byte_aligned() -> None:
    with pytest.raises(ValueError, match="16-byte"):
        build_acpi(TWO, BASE + 8)


@pytest.mark.parametrize(
    ("nodes", "message"),
    [
        ((NumaNode(0, (0, 1), ((0, GIB),)), NumaNode(1, (1,), ((GIB, 2 * GIB),))), "twice"),
        ((NumaNode(0, (1,), ((0, GIB),)),), "bootstrap"),
        ((NumaNode(0, (0,), ((0, 2 * GIB),)), NumaNode(1, (1,), ((GIB, 3 * GIB),))), "overlap"),
        ((NumaNode(0, (0,), ((0, GIB),)), NumaNode(2, (1,), ((GIB, 2 * GIB),))), "domains"),
        ((NumaNode(0, (0,), ((GIB, GIB),)),), "empty"),
    ],
)
def test_inconsistent_shapes_are_refused(nodes: tuple[NumaNode, ...], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        PlatformShape(nodes=nodes)


# --- MP table (MP spec 1.4 chapter 4) --------------------------------------------------


def parse_mptable(raw: bytes) -> tuple[dict[int, list[bytes]], int]:
    floating = raw[:16]
    assert floating[:4] == b"_MP_" and _sum(floating) == 0
    pointer, length, revision = struct.unpack_from("<IBB", floating, 4)
    assert (pointer, length, revision) == (MP_BASE + 16, 1, 4)
    assert floating[11] == 0 and floating[12] & 0x80 == 0  # config table present; no IMCR
    config = raw[16:]
    signature, base_length, revision = struct.unpack_from("<4sHB", config)
    assert (signature, revision) == (b"PCMP", 4)
    assert base_length == len(config) and _sum(config) == 0
    assert config[8:14] == b"SPANVM"
    count, lapic = struct.unpack_from("<HI", config, 34)
    assert lapic == 0xFEE00000
    entries: dict[int, list[bytes]] = {0: [], 1: [], 2: [], 3: [], 4: []}
    offset, kinds = 44, []
    for _ in range(count):
        kind = config[offset]
        size = 20 if kind == 0 else 8
        entries[kind].append(config[offset : offset + size])
        kinds.append(kind)
        offset += size
    assert offset == len(config)
    assert kinds == sorted(kinds)  # section 4.3: entries sorted by type
    return entries, count


@pytest.mark.parametrize("shape", [TWO, THREE], ids=["2-fragments", "3-fragments"])
def test_mptable_describes_every_cpu_the_isa_bus_and_the_ioapic(shape: PlatformShape) -> None:
    entries, count = parse_mptable(build_mptable(shape, MP_BASE))
    vcpus = sum(len(node.apic_ids) for node in shape.nodes)
    assert [len(entries[k]) for k in range(5)] == [vcpus, 1, 1, 16, 2]
    assert count == vcpus + 20
    cpus = [struct.unpack_from("<BBB", e, 1) for e in entries[0]]
    assert cpus == [(a, 0x14, 3 if a == 0 else 1) for a in range(vcpus)]
    assert entries[1] == [b"\x01\x00ISA   "]
    assert struct.unpack_from("<BBBI", entries[2][0], 1) == (0, 0x11, 1, 0xFEC00000)
    io = [struct.unpack_from("<BHBBBB", e, 1) for e in entries[3]]
    # (type, flags, bus, bus IRQ, IOAPIC id, pin): ExtINT on pin 0, IRQ0 on pin 2, no IRQ2
    assert io[0] == (3, 0, 0, 0, 0, 0)
    assert io[1] == (0, 0, 0, 0, 0, 2)
    by_irq = {irq: (kind, flags, pin) for kind, flags, _, irq, _, pin in io[1:]}
    assert sorted(by_irq) == [0, 1, *range(3, 16)]
    assert by_irq[9] == (0, 0xD, 9)
    assert all(by_irq[i] == (0, 0, i) for i in (1, *range(3, 9), *range(10, 16)))
    local = [struct.unpack_from("<BHBBBB", e, 1) for e in entries[4]]
    assert local == [(3, 0, 0, 0, 0xFF, 0), (1, 0, 0, 0, 0xFF, 1)]


def test_mptable_refuses_apic_ids_beyond_8_bits() -> None:
    with pytest.raises(ValueError, match="APIC id 299"):
        build_mptable(LARGE, MP_BASE)
    with pytest.raises(ValueError, match="16-byte"):
        build_mptable(TWO, MP_BASE + 4)


# --- ACPICA: iasl disassembles every table, acpiexec loads them -------------------------

IASL = shutil.which("iasl")
ACPIEXEC = shutil.which("acpiexec")


def _dump(tables: dict[str, Table], directory: Path) -> dict[str, Path]:
    paths = {}
    for signature, table in tables.items():
        path = directory / f"{signature.lower()}.dat"
        path.write_bytes(table.raw)
        paths[signature] = path
    return paths


def _run(*argv: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    assert argv[0], "ACPICA tools missing: hack/install-deps installs acpica-tools"
    return subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=60, check=False)


def _fields(dsl: str, name: str) -> list[str]:
    """Values of every `name : value` line iasl printed (value up to the first space)."""
    return re.findall(rf"^(?:\[[^]]*\])?\s+{re.escape(name)} : (\S+)", dsl, re.MULTILINE)


def _disassemble(path: Path) -> tuple[str, str]:
    """iasl's messages and the .dsl it wrote for one table file."""
    result = _run(IASL or "", "-d", path.name, cwd=path.parent)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    return output, path.with_suffix(".dsl").read_text()


def test_iasl_disassembles_every_table_without_complaint(tmp_path: Path) -> None:
    tables = read_all(THREE_PM1)
    dsl = {}
    for signature, path in _dump(tables, tmp_path).items():
        output, text = _disassemble(path)
        assert f"Acpi Data Table [{signature}] decoded" in output or signature == "DSDT", output
        for bad in ("Error", "Warning", "Incorrect", "Invalid", "Unknown"):
            assert bad not in output and bad not in text, (signature, bad, output)
        dsl[signature] = text
    vcpus = [a for node in THREE.nodes for a in node.apic_ids]
    assert _fields(dsl["APIC"], "Local Apic ID") == [f"{a:02X}" for a in sorted(vcpus)]
    assert _fields(dsl["APIC"], "Processor Enabled") == ["1"] * len(vcpus)
    assert _fields(dsl["APIC"], "Interrupt Input LINT") == ["01"]
    assert _fields(dsl["SRAT"], "Apic ID") == [f"{a:02X}" for a in sorted(vcpus)]
    domains = [f"{i:02X}" for i, node in enumerate(THREE.nodes) for _ in node.apic_ids]
    assert _fields(dsl["SRAT"], "Proximity Domain Low(8)") == domains
    ranges = [(i, s, e) for i, node in enumerate(THREE.nodes) for s, e in node.memory]
    assert _fields(dsl["SRAT"], "Proximity Domain") == [f"{i:08X}" for i, _, _ in ranges]
    assert _fields(dsl["SRAT"], "Base Address") == [f"{s:016X}" for _, s, _ in ranges]
    assert _fields(dsl["SRAT"], "Address Length") == [f"{e - s:016X}" for _, s, e in ranges]
    localities = re.findall(r"Locality +\d : (.*?)\s*$", dsl["SLIT"], re.MULTILINE)
    assert localities == ["0A 14 14", "14 0A 14", "14 14 0A"]
    assert _fields(dsl["FACP"], "SCI Interrupt") == ["0009"]
    assert _fields(dsl["FACP"], "Hardware Reduced (V5)") == ["0"]
    assert _fields(dsl["FACP"], "8042 Present on ports 60/64 (V2)") == ["0"]
    assert _fields(dsl["FACP"], "VGA Not Present (V4)") == ["1"]
    assert _fields(dsl["FACP"], "PM1A Event Block Address") == ["00000600"]
    assert _fields(dsl["FACP"], "PM1A Control Block Address") == ["00000604"]
    dsdt = f"{tables['DSDT'].address:016X}"
    assert _fields(dsl["FACP"], "DSDT Address") == [dsdt[8:], dsdt]
    assert 'DefinitionBlock ("", "DSDT", 2, "SPANVM", "SPANDSDT", 0x00000001)' in dsl["DSDT"]


@pytest.mark.parametrize("signature", ["APIC", "SRAT", "SLIT", "FACP", "XSDT"])
def test_iasl_recompiles_its_disassembly_to_the_same_bytes(tmp_path: Path, signature: str) -> None:
    """Every field iasl decoded means what we wrote: compiling its .dsl gives our table back
    (but for the compiler id/revision, which iasl stamps with its own, and so the checksum)."""
    table = read_all(LARGE if signature in ("APIC", "SRAT") else THREE)[signature]
    path = _dump({signature: table}, tmp_path)[signature]
    assert _run(IASL or "", "-d", path.name, cwd=tmp_path).returncode == 0
    result = _run(IASL or "", path.with_suffix(".dsl").name, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 Errors, 0 Warnings" in result.stdout
    compiled = path.with_suffix(".aml").read_bytes()
    assert len(compiled) == len(table.raw)

    def masked(raw: bytes) -> bytes:
        return raw[:9] + b"\0" + raw[10:28] + b"\0" * 8 + raw[36:]

    assert masked(compiled) == masked(table.raw)


def test_iasl_reports_only_the_missing_pm1_blocks_of_the_default_fadt(tmp_path: Path) -> None:
    """Without shape.pm1_port the FADT has no PM1a blocks, which ACPICA calls required."""
    path = _dump({"FACP": read_all(THREE)["FACP"]}, tmp_path)["FACP"]
    output, text = _disassemble(path)
    errors = [line for line in output.splitlines() if "Error" in line or "Warning" in line]
    assert [re.sub(r" \(\d+/tbfadt-\d+\)$", "", line) for line in errors] == [
        f"Firmware Error (ACPI): Required FADT field {field} has zero address and/or length: "
        "0x0000000000000000/0x0"
        for field in ("Pm1aEventBlock", "Pm1aControlBlock")
    ]
    assert "Incorrect" not in text and "Invalid" not in text


def _acpiexec(shape: PlatformShape, directory: Path) -> str:
    paths = _dump(read_all(shape), directory)
    names = [paths[s].name for s in ("FACP", "DSDT", "APIC", "SRAT", "SLIT")]
    result = _run(ACPIEXEC or "", "-b", "tables", *names, cwd=directory)
    output = result.stdout + result.stderr
    for signature in ("FACP", "DSDT", "APIC", "SRAT", "SLIT"):
        assert re.search(rf"ACPI: {signature} .*SPANVM SPAN{signature}", output), output
    assert "1 ACPI AML tables successfully acquired and loaded" in output, output
    return output


def test_acpiexec_enables_acpi_when_the_pm1_block_is_declared(tmp_path: Path) -> None:
    """ACPICA's own table manager (what Linux runs) parses the FADT, loads the DSDT into a
    namespace, installs MADT/SRAT/SLIT and enables the subsystem (it then initialises
    devices). Lines acpiexec's built-in exercises print about GPEs and the PM timer this
    platform does not have ("Unexpected AE_... from AcpiEnableGpe") are not about the tables.
    """
    output = _acpiexec(THREE_PM1, tmp_path)
    assert "Initializing Device/Processor/Thermal objects" in output, output
    assert not [line for line in output.splitlines() if "Error" in line or "****" in line]


def test_acpiexec_without_pm1_block_stops_at_fixed_events(tmp_path: Path) -> None:
    """The default FADT (no PM1 block): ACPICA loads every table, then cannot enable the
    subsystem; this is the documented behaviour of spanvm.vmm.acpi._fadt, nothing more."""
    output = _acpiexec(THREE, tmp_path)
    errors = [
        re.sub(r" \(\d+/\w+-\d+\)$", "", line)
        for line in output.splitlines()
        if "Error" in line or "****" in line
    ]
    assert errors == [
        "Firmware Error (ACPI): Required FADT field Pm1aEventBlock has zero address and/or "
        "length: 0x0000000000000000/0x0",
        "Firmware Error (ACPI): Required FADT field Pm1aControlBlock has zero address and/or "
        "length: 0x0000000000000000/0x0",
        "ACPI Error: AE_BAD_ADDRESS, Unable to initialize fixed events",
        "**** Could not EnableSubsystem, AE_BAD_ADDRESS",
    ], output

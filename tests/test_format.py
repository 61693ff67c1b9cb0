"""ledger.format: the one Python statement of docs/FORMAT.md. It agrees with the compiled core (and refuses to
import when it does not), with the page itself where the page states numbers, and its two shared checks (a segment
file's header, the search for a committed batch) refuse every kind of bad input."""
from __future__ import annotations

import importlib.util
import os
import re
import struct

import numpy as np
import pytest

from ledger import _core
from ledger import format as fmt
from ledger.errors import LedgerCorruptError

FORMAT_DOC = os.path.join(os.path.dirname(__file__), os.pardir, "docs", "FORMAT.md")
RECORDS_LOG2 = 10
PATH = "/somewhere/journal/00000003.segment"


# -- agreement with the core --

def _load_a_fresh_copy() -> None:
    """Execute ledger/format.py again as a module of its own (the imported one stays as it is)."""
    spec = importlib.util.spec_from_file_location("ledger_format_copy", fmt.__file__)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)


def test_format_agrees_with_the_compiled_core():
    fmt.check_against_core(_core.FORMAT, _core.REPLAY_REASONS, _core.EVENT_KINDS)
    assert fmt.RECORD_SIZE == _core.RECORD_SIZE and fmt.FORMAT_VERSION == _core.FORMAT_VERSION
    assert fmt.POSITION_MAX == _core.POSITION_MAX
    _load_a_fresh_copy()


@pytest.mark.parametrize("name", sorted(_core.FORMAT))
def test_import_fails_naming_a_value_the_core_has_otherwise(monkeypatch, name):
    monkeypatch.setitem(_core.FORMAT, name, _core.FORMAT[name] + 1)
    with pytest.raises(ImportError, match=name):
        _load_a_fresh_copy()


def test_import_fails_on_a_value_only_one_side_has(monkeypatch):
    monkeypatch.setitem(_core.FORMAT, "kind_refund", 7)
    with pytest.raises(ImportError, match="kind_refund"):
        _load_a_fresh_copy()


@pytest.mark.parametrize("table", ["REPLAY_REASONS", "EVENT_KINDS"])
def test_import_fails_when_the_replay_reasons_or_event_kinds_differ(monkeypatch, table):
    tampered = dict(getattr(_core, table))
    tampered[max(tampered)] = "renamed"
    monkeypatch.setattr(_core, table, tampered)
    with pytest.raises(ImportError, match="renamed"):
        _load_a_fresh_copy()


# -- agreement with docs/FORMAT.md --

@pytest.fixture(scope="module")
def doc() -> str:
    with open(FORMAT_DOC, encoding="utf-8") as file:
        return file.read()


def _section(doc: str, title: str) -> str:
    start = doc.index(title)
    end = doc.find("\n#", start + len(title))
    return doc[start:end if end != -1 else len(doc)]


def _table(section: str) -> list[tuple[int, int, str]]:
    """The (offset, size, field) rows of a layout table."""
    return [(int(offset), int(size), field.strip())
            for offset, size, field in re.findall(r"^\| (\d+) \| ([\d *]+?) \| (.+?) \|$", section, re.M)
            if size.strip().isdigit()]


def test_the_doc_states_the_same_version_record_size_and_segment_sizes(doc):
    assert re.search(r"^# On-disk format, version (\d+)$", doc, re.M).group(1) == str(fmt.FORMAT_VERSION)
    assert f"sequence of {fmt.RECORD_SIZE}-byte records" in doc
    low, high, default = map(int, re.search(r"`segment_records_log2`, (\d+) to (\d+), default (\d+)", doc).groups())
    assert (low, high, default) == (fmt.SEGMENT_RECORDS_LOG2_MIN, fmt.SEGMENT_RECORDS_LOG2_MAX,
                                    fmt.SEGMENT_RECORDS_LOG2_DEFAULT)
    assert f"A segment is `{fmt.SEGMENT_HEADER_BYTES} + {fmt.RECORD_SIZE} * 2**R` bytes" in doc


def test_the_doc_states_the_same_segment_header(doc):
    rows = _table(_section(doc, "## Segment file"))
    offsets = {field.split(" (")[0].split(":")[0]: offset for offset, _, field in rows}
    assert rows[0] == (0, 8, "magic `LDGRSEG\\0`") and fmt.SEGMENT_MAGIC == b"LDGRSEG\x00"
    # The struct's fields at the offsets of the table's rows, in order.
    struct_offsets, offset = [], 0
    for code in re.findall(r"\d*[sIQ]", fmt.SEGMENT_HEADER.format[1:]):
        struct_offsets.append(offset)
        offset += struct.calcsize("<" + code)
    assert struct_offsets == [row[0] for row in rows[:8]]
    assert offsets["CRC32C of bytes 0..47"] == fmt.SEGMENT_HEADER.size == 48
    assert rows[8][1] == fmt.SEGMENT_HEADER_CHECKSUM.size
    assert offsets["reserved, must be zero"] + rows[9][1] == fmt.SEGMENT_HEADER_BYTES
    assert rows[2] == (12, 4, f"record size ({fmt.RECORD_SIZE})") and rows[1][2] == f"format version ({fmt.FORMAT_VERSION})"


def test_the_doc_states_the_same_batch_header(doc):
    section = _section(doc, "### Batch header")
    rows = {field.split(":")[0].split(" ")[0].strip("`"): (offset, size) for offset, size, field in _table(section)}
    assert f"| 0 | 4 | magic `0x{fmt.HEADER_MAGIC:08X}`" in section
    assert f"commit word: `0x{fmt.COMMIT_MAGIC:08X} << 32 | checksum`" in section
    assert f"word A: exactly `{fmt.KIND_HEADER} << 56`" in section and fmt.HEADER_WORD_A == fmt.KIND_HEADER << 56
    assert "1 to 2**24 - 1" in section and fmt.BATCH_EVENTS_MAX == 2**24 - 1
    assert f"then header bytes 0..{fmt.HEADER_CHECKSUMMED_WORDS * 8 - 1}" in section
    for name, word in [("timestamp", fmt.WORD_TIMESTAMP), ("position", fmt.WORD_POSITION), ("count", fmt.WORD_COUNT),
                       ("previous_checksum", fmt.WORD_PREVIOUS_CHECKSUM), ("checksum", fmt.WORD_CHECKSUM),
                       ("word", fmt.WORD_A), ("commit", fmt.WORD_COMMIT)]:
        assert rows[name] == (word * 8, 8), name
    assert fmt.COMMIT_WORD_OFFSET == rows["commit"][0] and fmt.HEADER_WORDS.size == fmt.RECORD_SIZE


def test_the_doc_states_the_same_event_record_and_kinds(doc):
    section = _section(doc, "### Event record")
    assert f"bits 0..{fmt.POSITION_BITS - 1} previous event position of the debit account" in section
    assert f"bits {fmt.POSITION_BITS}..55 `code`" in section
    assert f"bit 4 (`0x{fmt.KIND_LINKED:02x}`) the LINKED flag" in section and fmt.KIND_MASK == 0x0F
    kinds = {int(number): name for number, name in re.findall(r"^\| (\d+) \| ([A-Za-z ]+?) \|", section, re.M)}
    assert kinds.pop(fmt.KIND_HEADER) == "batch header"
    assert {number: name.lower() for number, name in kinds.items()} == fmt.EVENT_KIND_NAMES
    for number, name in kinds.items():
        assert getattr(fmt, f"KIND_{name}") == number


def test_the_doc_states_the_same_durable_mark(doc):
    section = " ".join(_section(doc, "## The durable mark").split())
    assert f"{fmt.DURABLE_RECORD.size} bytes: the journal position (8)" in section
    assert "the format version (4, = 1), and the CRC32C of the 12 bytes before it (4)" in section
    assert "Position `2**64 - 1` (\"strict\")" in section and fmt.DURABLE_STRICT == 2**64 - 1
    assert f"`<dir>/journal/{fmt.DURABLE_NAME}`" in doc


# -- the segment-header check --

def segment_header_page(index: int = 3, records_log2: int = RECORDS_LOG2, **fields: object) -> bytes:
    values = {"magic": fmt.SEGMENT_MAGIC, "version": fmt.FORMAT_VERSION, "record_size": fmt.RECORD_SIZE,
              "records_log2": records_log2, "reserved": 0, "index": index, "first_position": index << records_log2,
              "created_ns": 1_700_000_000_000_000_000}
    values.update(fields)
    raw = fmt.SEGMENT_HEADER.pack(*values.values())
    page = raw + fmt.SEGMENT_HEADER_CHECKSUM.pack(_core.crc32c(raw))
    return page + bytes(fmt.SEGMENT_HEADER_BYTES - len(page))


def test_a_good_segment_header_passes():
    header = fmt.check_segment_header(segment_header_page(), PATH, 3, RECORDS_LOG2)
    assert header.records_log2 == RECORDS_LOG2 and header.index == 3 and header.first_position == 3 << RECORDS_LOG2
    fmt.check_segment_size(PATH, fmt.segment_bytes(RECORDS_LOG2), RECORDS_LOG2, 3)


def _flip(page: bytes, offset: int) -> bytes:
    return page[:offset] + bytes([page[offset] ^ 0x01]) + page[offset + 1:]


BAD_SEGMENT_HEADERS = {
    "truncated": (lambda: segment_header_page()[:100], "truncated"),
    "empty": (lambda: b"", "truncated"),
    "reserved byte set": (lambda: _flip(segment_header_page(), 4000), "reserved"),
    "checksum": (lambda: _flip(segment_header_page(), 20), "checksum"),
    "magic": (lambda: segment_header_page(magic=b"LDGRSNP\x00"), "not a ledger segment"),
    "version": (lambda: segment_header_page(version=2), "format version 2"),
    "record size": (lambda: segment_header_page(record_size=32), "inconsistent"),
    "records log2 too small": (lambda: segment_header_page(records_log2=9), "inconsistent"),
    "records log2 too large": (lambda: segment_header_page(records_log2=25), "inconsistent"),
    "index": (lambda: segment_header_page(index=4), "inconsistent"),
    "first position": (lambda: segment_header_page(first_position=1), "inconsistent"),
    "size differs from segment 0": (lambda: segment_header_page(records_log2=11), "differs from segment 0"),
}


@pytest.mark.parametrize("damage", sorted(BAD_SEGMENT_HEADERS))
def test_a_bad_segment_header_is_corruption_naming_the_file(damage):
    make, message = BAD_SEGMENT_HEADERS[damage]
    with pytest.raises(LedgerCorruptError, match=message) as raised:
        fmt.check_segment_header(make(), PATH, 3, RECORDS_LOG2)
    assert PATH in str(raised.value)


def test_the_reserved_byte_set_is_named_by_its_offset():
    with pytest.raises(LedgerCorruptError, match="byte offset 4000"):
        fmt.check_segment_header(_flip(segment_header_page(), 4000), PATH, 3)


@pytest.mark.parametrize("size, message", [(0, "cut short"), (fmt.SEGMENT_HEADER_BYTES + 64 * 5, "position 3077"),
                                           (fmt.segment_bytes(RECORDS_LOG2) + 1, "expected")])
def test_a_segment_file_of_another_size_is_corruption(size, message):
    with pytest.raises(LedgerCorruptError, match=message) as raised:
        fmt.check_segment_size(PATH, size, RECORDS_LOG2, 3)
    assert PATH in str(raised.value)


# -- the committed-batch scan --

JOURNAL_RECORDS = 64


def write_batch(journal: np.ndarray, position: int, count: int, previous_checksum: int = 0) -> int:
    """Write a committed batch of `count` transfers at `position` into the uint64 (n, 8) `journal`; its checksum."""
    for offset in range(1, count + 1):
        journal[position + offset] = [100 + offset, 1, 2, 5, 0, 0, fmt.KIND_TRANSFER << 56, offset << fmt.POSITION_BITS]
    header = journal[position]
    header[:] = [fmt.HEADER_MAGIC_VERSION, 1000, position, count, previous_checksum, 0, fmt.HEADER_WORD_A, 0]
    crc = fmt.batch_checksum(header, [journal[position + 1:position + 1 + count]])
    header[fmt.WORD_CHECKSUM] = crc
    header[fmt.WORD_COMMIT] = (fmt.COMMIT_MAGIC << 32) | crc
    return crc


def scan(journal: np.ndarray, start: int = 1, batch_end: int = JOURNAL_RECORDS) -> int | None:
    return fmt.committed_batch_in([(start, journal[start:])], lambda first, end: [journal[first:end]], batch_end)


def test_the_scan_finds_a_committed_batch_and_agrees_with_the_core_checksum():
    journal = np.zeros((JOURNAL_RECORDS, 8), np.uint64)
    write_batch(journal, 10, 3)
    assert scan(journal) == 10
    crc = _core.crc32c(journal[11:14].tobytes())
    assert _core.crc32c(journal[10, :5].tobytes(), crc) == int(journal[10, fmt.WORD_CHECKSUM])
    assert scan(journal, start=11) is None   # it is before the range searched


BAD_BATCHES = {
    "no commit word": lambda header, events: header.__setitem__(fmt.WORD_COMMIT, header[fmt.WORD_CHECKSUM]),
    "word A": lambda header, events: header.__setitem__(fmt.WORD_A, fmt.HEADER_WORD_A | 1),
    "magic and version": lambda header, events: header.__setitem__(fmt.WORD_MAGIC_VERSION, fmt.HEADER_MAGIC),
    "its own position": lambda header, events: header.__setitem__(fmt.WORD_POSITION, 11),
    "count 0": lambda header, events: header.__setitem__(fmt.WORD_COUNT, 0),
    "count too large": lambda header, events: header.__setitem__(fmt.WORD_COUNT, fmt.BATCH_EVENTS_MAX + 1),
    "runs past the end": lambda header, events: header.__setitem__(fmt.WORD_COUNT, JOURNAL_RECORDS),
    "an event byte": lambda header, events: events.__setitem__((1, 3), events[1, 3] ^ np.uint64(1)),
    "header checksum": lambda header, events: header.__setitem__(fmt.WORD_CHECKSUM, header[fmt.WORD_CHECKSUM] ^ 1),
    "commit word checksum": lambda header, events: header.__setitem__(fmt.WORD_COMMIT, header[fmt.WORD_COMMIT] ^ 1),
}


@pytest.mark.parametrize("damage", sorted(BAD_BATCHES))
def test_the_scan_passes_over_a_batch_that_is_not_committed_whole(damage):
    journal = np.zeros((JOURNAL_RECORDS, 8), np.uint64)
    write_batch(journal, 10, 3)
    BAD_BATCHES[damage](journal[10], journal[11:14])
    assert scan(journal) is None
    good = write_batch(journal, 40, 2)
    assert scan(journal) == 40 and good   # the next committed one is found past it


def test_the_scan_respects_the_batch_end_it_is_given():
    journal = np.zeros((JOURNAL_RECORDS, 8), np.uint64)
    write_batch(journal, 10, 3)
    assert scan(journal, batch_end=14) == 10
    assert scan(journal, batch_end=13) is None


@pytest.mark.parametrize("position, fields, problem", [
    (5, [fmt.HEADER_MAGIC_VERSION, 0, 5, 1, 0, 0, fmt.HEADER_WORD_A, 0], None),
    (5, [fmt.HEADER_MAGIC_VERSION, 0, 6, 1, 0, 0, fmt.HEADER_WORD_A, 0], "header"),
    (fmt.POSITION_MAX, [fmt.HEADER_MAGIC_VERSION, 0, fmt.POSITION_MAX, 1, 0, 0, fmt.HEADER_WORD_A, 0], "header"),
    (fmt.POSITION_MAX - 1, [fmt.HEADER_MAGIC_VERSION, 0, fmt.POSITION_MAX - 1, 1, 0, 0, fmt.HEADER_WORD_A, 0], None),
])
def test_header_problem(position, fields, problem):
    assert fmt.header_problem(position, fields) == problem


# -- data read from disk is judged by real checks, never by assert (which `python -O` strips) --

DAMAGED_UNDER_O = r"""
import os, sys
import ledger
from ledger import format as fmt
assert sys.flags.optimize, "this must run under python -O"
directory = sys.argv[1]
with ledger.open(directory, create=True, segment_records_log2=10) as handle:
    handle.create_account(1, min_balance=ledger.BALANCE_MIN)
    handle.create_account(2)
    for transfer_id in range(1, 6):
        handle.transfer(transfer_id, 1, 2, 10)
segment = os.path.join(directory, "journal", fmt.segment_name(0))
with open(segment, "r+b") as file:     # an event of the first batch (more batches follow it): corruption
    file.seek(fmt.SEGMENT_HEADER_BYTES + 2 * fmt.RECORD_SIZE + 24)
    byte = file.read(1)[0]
    file.seek(-1, 1)
    file.write(bytes([byte ^ 1]))
for attempt in ("open", "tail"):
    try:
        if attempt == "open":
            ledger.open(directory).close()
        else:
            list(ledger.tail(directory, follow=False))
    except ledger.LedgerCorruptError as error:
        assert segment in str(error) and "journal position" in str(error), error
        print(attempt, "refused")
with open(segment, "r+b") as file:     # the reserved part of the segment header
    file.seek(1000)
    file.write(b"\x01")
for attempt in ("open", "tail"):
    try:
        if attempt == "open":
            ledger.open(directory, readonly=True).close()
        else:
            ledger.tail(directory, 1, follow=False).poll()
    except ledger.LedgerCorruptError as error:
        assert segment in str(error) and "byte offset 1000" in str(error), error
        print(attempt, "refused the header")
"""


def test_damaged_files_are_refused_under_python_O(tmp_path):
    import subprocess
    import sys
    environment = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(fmt.__file__))))
    completed = subprocess.run([sys.executable, "-O", "-c", DAMAGED_UNDER_O, str(tmp_path / "ledger")],
                               capture_output=True, text=True, timeout=300, env=environment)
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.split("\n")[:4] == ["open refused", "tail refused", "open refused the header",
                                                "tail refused the header"], completed.stdout


def _events(*rows: tuple[int, int, int, int, int]) -> np.ndarray:
    """EVENT_DTYPE rows of (position, kind, debit_account, credit_account, aux)."""
    events = np.zeros(len(rows), _core.EVENT_DTYPE)
    for row, (position, kind, debit_account, credit_account, aux) in zip(events, rows):
        row["position"], row["kind"], row["amount"], row["aux"] = position, kind, 5, aux
        row["debit_account"], row["credit_account"] = debit_account, credit_account
    return events


def test_history_refuses_an_event_of_another_account_read_from_the_journal(tmp_path):
    import ledger
    from ledger import history
    with ledger.open(str(tmp_path / "ledger"), create=True, segment_records_log2=10) as handle:
        handle.create_account(1, min_balance=ledger.BALANCE_MIN)
        handle.create_account(2)
        with pytest.raises(LedgerCorruptError, match=r"journal position 9\b") as raised:
            history._movements(handle, 1, _events((8, fmt.KIND_TRANSFER, 1, 2, 0), (9, fmt.KIND_TRANSFER, 7, 8, 0)))
        assert fmt.segment_name(0) in str(raised.value) and "not of account 1" in str(raised.value)
        with pytest.raises(LedgerCorruptError, match=r"pending transfer 77, which is unknown.*journal position 12"):
            history._movements(handle, 2, _events((12, fmt.KIND_POST, 1, 2, 77)))

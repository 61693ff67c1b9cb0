"""Planted bugs: each must make the tests that guard its promise fail.

    python bench/mutants.py              # every mutant, in order (a few minutes: each core mutant rebuilds)
    python bench/mutants.py --list       # the table
    python bench/mutants.py chain-core fdatasync-fsync-mode   # some of them, by name

Works on a copy of the checkout (the working tree as it is, uncommitted changes included, without build outputs)
in a temporary directory: builds it there in place, checks that the guarding tests pass unmutated, then for each
mutant applies one exact text substitution, rebuilds if it touched compiled code, runs its tests with the copy
first on the path, and puts the text back. The checkout it is run from is never modified. Not run in CI (it
rebuilds the core several times); run it when you change a guarded path, and put its last output in
bench/RESULTS.md ("Mutants").

Each mutant's `old` text must occur exactly once in its file: when the code around it changes, the script stops
and says which pattern to update (short patterns are easier to keep current). A mutant is caught when its tests
fail (pytest exit 1) or the test process dies of a signal (a core assertion aborting counts: the bug is loud);
any other exit (usage error, no tests collected) is a broken mutant entry, reported as such."""
from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import subprocess
import sys
import tempfile
import time


@dataclasses.dataclass(frozen=True)
class Mutant:
    name: str
    file: str      # relative to the checkout
    old: str       # exact text, occurring once
    new: str
    tests: tuple[str, ...]   # pytest arguments (files, -k expressions)
    promise: str   # what it breaks


# The table: one row per planted bug.
MUTANTS = [
    Mutant("engine-lock-bypassed", "ledger/_core_engine.pxi",
           "        return self._enter_contended(thread)\n",
           "        self._lock_depth += 1\n        return 0\n",
           ("tests/test_threads.py", "-k", "four_threads_share_one_handle"),
           "a second thread enters the engine while another one's batch runs"),
    Mutant("old-segment-pointer-kept", "ledger/_core_validation.pxi",
           "    cdef Event pending_event = event_at(s, pending_position)[0]\n    cdef Event *pending = &pending_event\n",
           "    cdef Event *pending = event_at(s, pending_position)\n",
           ("tests/test_segments.py", "-k", "resolved_while_its_segment_is_unmapped"),
           "a POST reads the pending event through a pointer into a segment mapping that reading its header unmapped"),
    Mutant("old-records-trusted", "ledger/_core_records.pxi",
           "return ledger_likely(position >= s.verified_from) or verify_old_record(s, position)",
           "return True",
           ("tests/test_damaged_reads.py", "-k", "flipped_amount or exists_retry or resolving"),
           "a read of a record from before the snapshot uses its fields without checking its batch"),
    Mutant("chain-core", "ledger/_core_replay.pxi",
           "    if header.previous_checksum != previous_checksum:\n        return REPLAY_CHAIN",
           "    if False:\n        return REPLAY_CHAIN",
           ("tests/test_integrity.py", "-k", "chain and not tailer"),
           "a batch with a valid checksum and a wrong previous_checksum opens, restores and passes verify"),
    Mutant("replay-keeps-refused-events", "ledger/_core_replay.pxi",
           "            undo_event(s, stopped, True)\n",
           "            pass\n",
           ("tests/test_replication.py", "-k", "undone_whole or undoes_every_kind"),
           "a standby that refuses a replicated batch keeps the events of it applied before the refused one"),
    Mutant("chain-tail", "ledger/tail.py",
           "if fields[WORD_PREVIOUS_CHECKSUM] != checksum:",
           "if False:",
           ("tests/test_integrity.py", "-k", "tailer"),
           "the tailer follows a forged chain"),
    Mutant("fdatasync-fsync-mode", "ledger/journal.py",
           "os.fdatasync(segment.fd)\n            self._inject(\"synced\")",
           "self._inject(\"synced\")",
           ("tests/test_integrity.py", "-k", "syncs_each_batch or segment_and_its_directory"),
           "durability fsync acknowledges a batch that was written but never synced"),
    Mutant("directory-fsync-new-segment", "ledger/segments.py",
           "step = \"fsyncing the journal directory for\"\n            fsync_directory(self.journal_directory)",
           "step = \"fsyncing the journal directory for\"",
           ("tests/test_integrity.py", "-k", "segment_and_its_directory"),
           "a new segment's directory entry may be lost in a power cut with batches acknowledged in it"),
    Mutant("min-balance-by-one", "ledger/_core_validation.pxi",
           "< debit.min_balance + amount:",
           "< debit.min_balance + amount - 1:",
           ("tests/test_rules.py",),
           "a balance may go 1 below min_balance"),
    Mutant("exists-ignores-user-data", "ledger/_core_validation.pxi",
           " or t.user_data != e.user_data:",
           ":",
           ("tests/test_rules.py",),
           "EXISTS is answered for a transfer whose user_data differs"),
    Mutant("conservation-partial-post", "ledger/_core_apply.pxi",
           "        credit.credits_posted += e.amount\n        state = STATE_PENDING_POSTED",
           "        credit.credits_posted += pending_amount\n        state = STATE_PENDING_POSTED",
           ("tests/test_rules.py",),
           "a partial post credits the whole pending amount: debits and credits no longer balance"),
    Mutant("linked-rollback-keeps-first", "ledger/_core_batch.pxi",
           "while p > chain_position:",
           "while p > chain_position + 1:",
           ("tests/test_rules.py",),
           "a failed LINKED chain keeps its first event applied"),
    Mutant("pending-resolved-twice", "ledger/_core_validation.pxi",
           "    if state == STATE_PENDING_POSTED:\n        return RT_PENDING_ALREADY_POSTED\n",
           "",
           ("tests/test_rules.py",),
           "a pending transfer already posted can be resolved again"),
    Mutant("torn-tail-zeroes-past-the-tail", "ledger/recovery.py",
           "self._zero(position, torn_end)",
           "self._zero(position - 1, torn_end)",
           ("tests/test_journal.py", "-k", "torn_tail_at_every_byte_offset or truncated_last_segment"),
           "recovery of a torn tail also zeroes the last record of the batch before it (acknowledged)"),
    Mutant("snapshot-body-checksum-ignored", "ledger/snapshot.py",
           "if body_checksum != body_expected:",
           "if False:",
           ("tests/test_snapshot.py", "tests/test_audit.py", "-k", "damaged or pieces"),
           "a snapshot whose body is damaged is loaded"),
    Mutant("ring-result-of-another-slot", "ledger/_ring.pyx",
           "<uint64_t>status_in[i] << 8) | code_in[i])",
           "<uint64_t>status_in[i] << 8) | code_in[count - 1 - i])",
           ("tests/test_ring.py",),
           "a ring producer receives the result code of another slot of the same group"),
]

COMPILED_SUFFIXES = (".pyx", ".pxd", ".pxi", ".h")
IGNORED = shutil.ignore_patterns(".git", "build", "*.so", "*.c", "__pycache__", ".benchmarks", ".pytest_cache",
                                 ".hypothesis", "*.egg-info")
BUILD_TIMEOUT_S = 900
TEST_TIMEOUT_S = 1200


def checkout_root() -> str:
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(arguments: list[str], directory: str, timeout_s: int) -> subprocess.CompletedProcess:
    environment = dict(os.environ, PYTHONPATH=directory, PYTHONDONTWRITEBYTECODE="1")
    return subprocess.run(arguments, cwd=directory, env=environment, capture_output=True, text=True,
                          timeout=timeout_s)


def build(directory: str) -> None:
    started = time.monotonic()
    outcome = run([sys.executable, "setup.py", "build_ext", "--inplace", "-q"], directory, BUILD_TIMEOUT_S)
    if outcome.returncode != 0:
        raise SystemExit(f"build failed in {directory}:\n{outcome.stdout[-3000:]}{outcome.stderr[-3000:]}")
    print(f"  (built in {time.monotonic() - started:.0f} s)", flush=True)


def pytest(directory: str, tests: tuple[str, ...]) -> subprocess.CompletedProcess:
    return run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *tests], directory,
               TEST_TIMEOUT_S)


def last_line(outcome: subprocess.CompletedProcess) -> str:
    lines = [line for line in (outcome.stdout + outcome.stderr).splitlines() if line.strip()]
    return lines[-1][:160] if lines else "(no output)"


def check_patterns(directory: str, mutants: list[Mutant]) -> None:
    """Every pattern occurs exactly once, before anything is built: a stale one is reported with its name."""
    stale = []
    for mutant in mutants:
        with open(os.path.join(directory, mutant.file)) as file:
            found = file.read().count(mutant.old)
        if found != 1:
            stale.append(f"{mutant.name}: {mutant.file} holds the pattern {found} times (must be once): "
                         f"{mutant.old!r}")
    if stale:
        raise SystemExit("stale mutant patterns, update the table in bench/mutants.py:\n  " + "\n  ".join(stale))


def apply(directory: str, mutant: Mutant) -> str:
    """Apply the substitution; returns the original text of the file."""
    path = os.path.join(directory, mutant.file)
    with open(path) as file:
        original = file.read()
    assert original.count(mutant.old) == 1, mutant.name
    with open(path, "w") as file:
        file.write(original.replace(mutant.old, mutant.new))
    return original


def restore_file(directory: str, mutant: Mutant, original: str) -> None:
    with open(os.path.join(directory, mutant.file), "w") as file:
        file.write(original)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", help="mutants to run (default: all)")
    parser.add_argument("--list", action="store_true", help="print the table and exit")
    parser.add_argument("--keep", action="store_true", help="keep the temporary copy (its path is printed)")
    options = parser.parse_args()
    if options.list:
        for mutant in MUTANTS:
            print(f"{mutant.name:34} {mutant.file:28} {' '.join(mutant.tests)}\n{'':34} {mutant.promise}")
        return 0
    known = {mutant.name: mutant for mutant in MUTANTS}
    unknown = [name for name in options.names if name not in known]
    if unknown:
        raise SystemExit(f"unknown mutants {unknown}; known: {sorted(known)}")
    mutants = [known[name] for name in options.names] if options.names else MUTANTS

    source = checkout_root()
    workspace = tempfile.mkdtemp(prefix="ledger-mutants-")
    directory = os.path.join(workspace, "ledger")
    started = time.monotonic()
    try:
        shutil.copytree(source, directory, ignore=IGNORED)
        check_patterns(directory, mutants)
        print(f"copy of {source} in {directory}", flush=True)
        build(directory)
        # An editable install of another checkout would answer for a module the copy lacks: every module must be
        # the copy's, or a mutant of the core would run against another core and "survive".
        located = run([sys.executable, "-c", "import ledger, ledger._core, ledger._ring\n"
                       "for m in (ledger, ledger._core, ledger._ring): print(m.__file__)"], directory, 60)
        paths = located.stdout.split()
        assert len(paths) == 3 and all(path.startswith(directory) for path in paths), \
            f"the copy imports another ledger: {located.stdout}{located.stderr}"

        # The guarding tests must pass unmutated, or a "caught" would mean nothing.
        baseline = sorted({mutant.tests for mutant in mutants})
        for tests in baseline:
            outcome = pytest(directory, tests)
            if outcome.returncode != 0:
                raise SystemExit(f"the unmutated copy fails {' '.join(tests)}: {last_line(outcome)}")
        print(f"unmutated: {len(baseline)} test selections pass", flush=True)

        rows = []
        stale_build = False   # the built modules hold a mutant whose source text was put back
        for mutant in mutants:
            print(f"{mutant.name}: {mutant.promise}", flush=True)
            compiled = mutant.file.endswith(COMPILED_SUFFIXES)
            original = apply(directory, mutant)
            try:
                if compiled or stale_build:
                    build(directory)   # rebuilds every module whose source changed: this one, and any put back
                stale_build = False
                mutant_started = time.monotonic()
                outcome = pytest(directory, mutant.tests)
                seconds = time.monotonic() - mutant_started
            finally:
                restore_file(directory, mutant, original)
                stale_build = compiled
            if outcome.returncode == 1 or outcome.returncode < 0:
                verdict = "caught" if outcome.returncode == 1 else f"caught (test process killed by signal " \
                                                                   f"{-outcome.returncode})"
            elif outcome.returncode == 0:
                verdict = "SURVIVED"
            else:
                verdict = f"BROKEN ENTRY (pytest exit {outcome.returncode})"
            print(f"  {verdict} in {seconds:.0f} s: {last_line(outcome)}", flush=True)
            rows.append((mutant, verdict))
    finally:
        if options.keep:
            print(f"kept {directory}")
        else:
            shutil.rmtree(workspace, ignore_errors=True)

    print(f"\n| mutant | file | promise broken | tests | result |\n| --- | --- | --- | --- | --- |")
    for mutant, verdict in rows:
        print(f"| {mutant.name} | {mutant.file} | {mutant.promise} | `{' '.join(mutant.tests)}` | {verdict} |")
    survivors = [mutant.name for mutant, verdict in rows if not verdict.startswith("caught")]
    print(f"\n{len(rows) - len(survivors)} of {len(rows)} planted bugs caught in {time.monotonic() - started:.0f} s"
          + (f"; not caught: {', '.join(survivors)}" if survivors else ""))
    return 1 if survivors else 0


if __name__ == "__main__":
    sys.exit(main())

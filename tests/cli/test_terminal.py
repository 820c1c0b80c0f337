"""What a terminal shows: file names in an 80-column table, file names with control characters, the
rates of the progress bars, and the label conflicts training finds. Real processes on real scans."""

from __future__ import annotations

import os
import pty
import select
import shutil
import subprocess
from pathlib import Path

from rich.progress import Progress

from helpers import cli_command, cli_env, run_cli
from retinalens._console import _Rate, printable

EVIL = "scan\x1b[31m\nred.jpeg"  # an escape sequence that recolours the terminal, and a line break


def run_in_terminal(*args: object, columns: int = 80) -> tuple[int, str]:
    """`retinalens ARGS` with stdout and stderr on a pseudo-terminal of `columns` columns."""
    main, child = pty.openpty()
    proc = subprocess.Popen(cli_command(*args), stdin=subprocess.DEVNULL, stdout=child, stderr=child,
                            env=cli_env() | {"COLUMNS": str(columns), "TERM": "xterm"})
    os.close(child)
    out = b""
    while True:
        ready, _, _ = select.select([main], [], [], 300)
        try:
            chunk = os.read(main, 65536) if ready else b""
        except OSError:  # the child closed the terminal
            chunk = b""
        if not chunk:
            break
        out += chunk
    os.close(main)
    return proc.wait(timeout=60), out.decode("utf-8", "replace")


def test_predict_table_keeps_the_ends_that_tell_files_apart(tmp_path, small_bundle, small_dataset):
    scan = min((small_dataset / "test" / "CNV").glob("*.jpeg"))
    folder = tmp_path / "r5" / "small" / "clinic-archive-2024" / "CNV"
    folder.mkdir(parents=True)
    names = [f"CNV-108392-{k}.jpeg" for k in (1, 2, 3)]  # differ only at the end
    for name in names:
        shutil.copy(scan, folder / name)
    code, out = run_in_terminal("predict", small_bundle.path, *(folder / n for n in names), "-q")
    assert code == 0, out
    rows = [ln for ln in out.splitlines() if "CNV-108392-" in ln]
    assert len(rows) == 3, out
    for name, row in zip(names, rows):
        assert name in row, out  # the whole file name, the part that differs included
    table = [ln for ln in out.splitlines() if ln.strip()]
    assert max(len(_visible(ln)) for ln in table) <= 80, out


def _visible(line: str) -> str:
    import re

    return re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", line).rstrip("\r")


def test_control_characters_in_file_names_are_shown_not_obeyed(tmp_path, small_bundle, small_dataset):
    scan = min((small_dataset / "test" / "DME").glob("*.jpeg"))
    evil = tmp_path / EVIL
    shutil.copy(scan, evil)
    broken = tmp_path / ("broken\x1b[2J" + ".jpeg")  # clear-screen, in a file that is not an image
    broken.write_bytes(b"not an image")
    shown = printable(evil)
    assert "\\x1b[31m\\nred.jpeg" in shown

    code, out = run_in_terminal("predict", small_bundle.path, evil, broken, "-q", columns=200)
    assert code == 0, out
    assert "\x1b[31m\nred" not in out and "\x1b[2J" not in out
    assert shown in out and "broken\\x1b[2J.jpeg" in out  # the table row, and the failure line

    r = run_cli("explain", small_bundle.path, evil, broken, "--out", tmp_path / "maps")
    assert r.returncode == 0, r.stderr
    assert "\x1b" not in r.stdout + r.stderr
    assert r.stdout.startswith(shown + " -> ") and len(r.stdout.splitlines()) == 1
    assert "broken\\x1b[2J.jpeg" in r.stderr and "failed" in r.stderr

    r = run_cli("predict", tmp_path / "no\x1b[31mbundle", evil)  # an error message that names the file
    assert r.returncode == 2 and "\x1b" not in r.stderr and "no\\x1b[31mbundle" in r.stderr


def test_piped_and_written_csv_escape_control_characters_json_keeps_the_name(tmp_path, small_bundle, small_dataset):
    """CSV (piped stdout and --csv): the name as the table shows it, every control character escaped, so
    that `cat out.csv` cannot be made to recolour or retitle a terminal; JSON keeps the exact name."""
    import csv
    import io
    import json

    evil = tmp_path / EVIL
    shutil.copy(min((small_dataset / "test" / "DME").glob("*.jpeg")), evil)
    broken = tmp_path / "broken\x1b]0;title\x07.jpeg"
    broken.write_bytes(b"not an image")
    r = run_cli("predict", small_bundle.path, evil, broken, "--csv", tmp_path / "out.csv", "--json",
                tmp_path / "out.json", "-q")
    assert r.returncode == 0, r.stderr
    written = (tmp_path / "out.csv").read_text()
    assert r.stdout == written and "\x1b" not in written and "\x07" not in written
    rows = list(csv.DictReader(io.StringIO(written)))
    assert [row["input"] for row in rows] == [printable(evil), printable(broken)]
    assert rows[0]["label"] and printable(broken) in rows[1]["error"]
    assert [x["input"] for x in json.loads((tmp_path / "out.json").read_text())] == [str(evil), str(broken)]


def test_the_rate_is_per_second_or_seconds_per_unit():
    now = [0.0]
    with Progress(_Rate("epoch"), _Rate("img"), get_time=lambda: now[0], disable=True) as bar:
        slow = bar.add_task("train", total=10, initial=0)
        now[0] = 95.0
        bar.advance(slow, 1)
        now[0] = 190.0
        bar.advance(slow, 1)  # 95 s an epoch: rich's own 30-second window has no speed for it
        assert _Rate("epoch").render(bar.tasks[slow]).plain.strip() == "95.0 s/epoch"
        resumed = bar.add_task("train", total=10, completed=4, initial=4)
        assert _Rate("epoch").render(bar.tasks[resumed]).plain.strip() == "- epoch/s"  # none done yet
        fast = bar.add_task("extract", total=1000)
        for _ in range(10):
            now[0] += 0.5
            bar.advance(fast, 20)
        assert _Rate("img").render(bar.tasks[fast]).plain.strip() == "40.0 img/s"


def test_training_says_which_copies_of_one_image_disagree(tmp_path, small_dataset, feature_cache):
    data = tmp_path / "d"
    shutil.copytree(small_dataset, data)
    original = min((data / "train" / "CNV").glob("*.jpeg"))
    copy = data / "train" / "NORMAL" / ("NORMAL-9" + original.name)  # the same bytes, another label
    shutil.copy(original, copy)
    r = run_cli("train", data, "--out", tmp_path / "b", "--epochs", "2", "-q", RETINALENS_CACHE=str(feature_cache))
    assert r.returncode == 0, r.stderr
    [line] = [ln for ln in r.stderr.splitlines() if "label conflict" in ln]
    assert str(original) in line and str(copy) in line and "(CNV)" in line and "(NORMAL)" in line, line

"""Every command's --help at 80 columns: no line too long or cut, no words glued, no ragged breaks."""

from __future__ import annotations

import json
import re
import subprocess
import sys

from helpers import cli_env

# Every page and every help string, from one process (the real entry point, the real terminal width).
DUMP = """
import contextlib, inspect, io, json, typer.main
from retinalens.cli.main import app, main
group = typer.main.get_command(app)
commands = {"": group, **group.commands, **{"prepare " + n: c for n, c in group.commands["prepare"].commands.items()}}
pages, texts = {}, {}
for name, cmd in commands.items():
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        main([*name.split(), "--help"])
    pages[name] = buf.getvalue()
    texts[name] = [inspect.cleandoc(cmd.help or "")] + [p.help for p in cmd.params if getattr(p, "help", None)]
print(json.dumps({"pages": pages, "texts": texts}))
"""
# The capitalised words inside which a lowercase letter meets an uppercase one.
NAMES = {"RetinaLens", "TorchScript", "PyTorch", "ImageNet", "EfficientNet", "SQLite", "SQLAlchemy", "PostgreSQL",
         "GradCAM", "EyeNet", "CoreML", "AdamW"}


def test_every_help_page_reads_well_at_80_columns():
    r = subprocess.run([sys.executable, "-c", DUMP], capture_output=True, text=True, env=cli_env() | {"COLUMNS": "80"},
                       timeout=300, check=False)
    assert r.returncode == 0, r.stderr
    dump = json.loads(r.stdout.strip().splitlines()[-1])
    assert {"extract", "train", "evaluate", "report", "predict", "explain", "export", "serve", "retrain", "demo",
            "backbones", "prepare fundus"} <= set(dump["pages"])
    for name, page in dump["pages"].items():
        for line in page.splitlines():
            assert len(line) <= 80, (name, line)
            assert "…" not in line, (name, line)  # a word too long for its column, cut
    for name, texts in dump["texts"].items():
        assert texts[0], f"{name or 'retinalens'} has no help"
        for text in texts:
            for paragraph in text.split("\n\n"):
                # rich keeps a line break inside a paragraph and then wraps again: a ragged line
                assert "\n" not in paragraph, (name, paragraph)
            assert "  " not in text, (name, text)
            glued = [w for w in re.findall(r"\S*[a-z][A-Z]\S*", text) if w.strip(".,;:()`'") not in NAMES]
            glued += re.findall(r"\S*[a-z][.;:!?][A-Z]\S*", text)  # a sentence run into the next
            assert not glued, (name, glued, text)

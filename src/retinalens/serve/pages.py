"""The HTML pages: self-contained (inline CSS and JS, nothing fetched from elsewhere), so they work offline.

The analysis page is a package file (static/index.html) with the model card embedded as JSON; the
model card and API pages are rendered here from the manifest and from the OpenAPI schema. Every value
is escaped.
"""

from __future__ import annotations

import json
from html import escape
from importlib import resources
from typing import Any


def _static(name: str) -> str:
    return resources.files("retinalens.serve").joinpath("static", name).read_text(encoding="utf-8")


def _page(title: str, body: str) -> str:
    return (f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1"><title>{escape(title)}</title>'
            '<link rel="icon" href="data:,">'
            f'<style>{_static("style.css")}</style></head><body><header><h1>RetinaLens</h1><nav><a href="/">Analyse</a>'
            f'<a href="/model">Model card</a><a href="/docs">API</a></nav></header><main>{body}</main></body></html>\n')


def _script_json(obj: Any) -> str:
    """JSON safe inside <script>: no '</script>' or '<!--' can end it early."""
    return json.dumps(obj).replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def index_page(card: dict[str, Any]) -> str:
    return (_static("index.html").replace("/*STYLE*/", _static("style.css"))
            .replace("/*MODEL*/", escape(card["name"])).replace("/*CLASSES*/", escape(", ".join(card["classes"])))
            .replace("/*CARD*/", _script_json(card)))


def _table(rows: list[dict[str, Any]]) -> str:
    keys = list(dict.fromkeys(k for row in rows for k in row))
    head = "".join(f"<th>{escape(str(k))}</th>" for k in keys)
    body = "".join("<tr>" + "".join(f"<td>{_fmt(row.get(k, ''))}</td>" for k in keys) + "</tr>" for row in rows)
    return f'<table class="data"><tr>{head}</tr>{body}</table>'


def _fmt(value: Any) -> str:
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        return _table(value)
    if isinstance(value, float):
        return f"{value:.3f}"
    if isinstance(value, list) and all(isinstance(v, (int, float)) for v in value):
        return " – ".join(_fmt(v) for v in value) if len(value) == 2 and all(isinstance(v, float) for v in value) \
            else ", ".join(_fmt(v) for v in value)
    if isinstance(value, list):
        return ", ".join(escape(str(v)) for v in value)
    return escape(str(value))


def _dl(obj: dict[str, Any]) -> str:
    """A nested dict as nested definition lists."""
    rows = []
    for key, value in obj.items():
        if value is None or value == {} or value == []:
            continue
        inner = _dl(value) if isinstance(value, dict) else _fmt(value)
        rows.append(f"<dt>{escape(str(key).replace('_', ' '))}</dt><dd>{inner}</dd>")
    return f'<dl class="kv">{"".join(rows)}</dl>'


def _splits_table(splits: dict[str, Any], classes: list[str]) -> str:
    names = [n for n in ("train", "val", "test") if isinstance(splits.get(n), dict)]
    if not names:
        return ""
    head = "".join(f"<th>{escape(c)}</th>" for c in classes)
    rows = "".join(f"<tr><th>{n}</th><td>{splits[n].get('n_images', '')}</td><td>{splits[n].get('n_patients', '')}</td>"
                   + "".join(f"<td>{splits[n].get('per_class', {}).get(c, 0)}</td>" for c in classes) + "</tr>"
                   for n in names)
    removed = splits.get("removed", {}).get("n")
    note = f"<p>Removed from training (duplicates, patients shared with test): {removed}</p>" if removed else ""
    return (f'<table class="data"><tr><th>split</th><th>images</th><th>patients</th>{head}</tr>{rows}</table>{note}')


def model_card_page(card: dict[str, Any]) -> str:
    classes = card["classes"]
    referral = "".join(f"<tr><td>{escape(c)}</td><td>{escape(str(card['referral'].get(c) or '–'))}</td></tr>"
                       for c in classes)
    training = card.get("training_data") or {}
    sections = [
        f"<h2>Model card: {escape(card['name'])}</h2>",
        f'<p class="notice"><strong>Intended use.</strong> {escape(card["intended_use"])}</p>',
        "<h3>Version</h3>" + _dl(card["version"] | {"task": card.get("task")}),
        f'<h3>Classes and referral levels</h3><table class="data"><tr><th>class</th><th>referral</th></tr>{referral}</table>',
        "<h3>Model</h3>" + _dl({"backbone": card["backbone"], "feature precision": card.get("precision"),
                                "head": card.get("head")}),
        "<h3>Training data</h3>" + _dl({"layout": training.get("layout"),
                                        "unreadable images skipped": training.get("extract_failures")})
        + _splits_table(training.get("splits") or {}, classes),
        "<h3>Validation</h3>" + _dl({"metrics (95% CI, patient bootstrap)": card.get("validation"),
                                     "head selection": card.get("head_selection"),
                                     "logistic-regression baseline": card.get("baseline_logistic_regression")}),
    ]
    for title, key in (("Test metrics", "test_metrics"), ("Thresholds", "thresholds"), ("Calibration", "calibration"),
                       ("Quality gate", "quality_gate"), ("Lineage", "lineage"), ("Library versions", "library_versions")):
        if card.get(key):
            sections.append(f"<h3>{title}</h3>" + _dl(card[key]))
    return _page(f"Model card: {card['name']}", "\n".join(sections))


def docs_page(openapi: dict[str, Any]) -> str:
    """The API reference, rendered from the OpenAPI schema (the contract is /openapi.json)."""
    parts = [f"<h2>{escape(openapi['info']['title'])} API {escape(openapi['info']['version'])}</h2>",
             ('<p>The machine-readable contract is <a href="/openapi.json"><code>/openapi.json</code></a> (OpenAPI 3); '
              "this page is rendered from it on the server, so it needs no network.</p>"),
             ("<pre><code>curl -F files=@scan1.jpeg -F files=@scan2.png http://HOST:PORT/api/predict\n"
              "curl -H 'Content-Type: application/json' -d '{\"analysis_id\": \"ID\", \"label\": \"CNV\"}' "
              "http://HOST:PORT/api/feedback</code></pre>")]
    for path, methods in openapi.get("paths", {}).items():
        for method, op in methods.items():
            params = [f"<code>{escape(p['name'])}</code> ({escape(p['in'])}{', required' if p.get('required') else ''})"
                      for p in op.get("parameters", [])]
            body = op.get("requestBody", {}).get("content", {})
            responses = ", ".join(f"{escape(code)} {escape(r.get('description', ''))}"
                                  for code, r in op.get("responses", {}).items())
            parts.append(
                f'<section class="endpoint"><p><span class="method">{escape(method.upper())}</span>'
                f"<code>{escape(path)}</code> — {escape(op.get('summary', ''))}</p>"
                + (f"<p>Parameters: {', '.join(params)}</p>" if params else "")
                + (f"<p>Body: {', '.join(f'<code>{escape(t)}</code>' for t in body)}</p>" if body else "")
                + f"<p>Responses: {responses}</p></section>")
    return _page("RetinaLens API", "\n".join(parts))

"""The HTML pages: self-contained (inline CSS and JS, nothing fetched from elsewhere), so they work offline.

The analysis page is a package file (static/index.html) with the model card embedded as JSON; the
model card page renders the bundle's MODEL_CARD.md and the API page the OpenAPI schema. Every value
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


def model_card_page(card: dict[str, Any], markdown: str) -> str:
    """The model card: the bundle's MODEL_CARD.md text (bundle/card.py served_card_markdown), rendered
    with raw HTML off, so every value in it is escaped."""
    from ..bundle.card import card_html

    body = (card_html(markdown, heading_offset=1).replace("<table>", '<table class="data">')
            .replace("<p><strong>Intended use.</strong>", '<p class="notice"><strong>Intended use.</strong>', 1))
    return _page(f"Model card: {card['name']}", body)


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

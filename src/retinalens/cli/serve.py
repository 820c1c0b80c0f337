"""`retinalens serve BUNDLE`: the web app, the REST API and the feedback store (extra `serve`)."""

from __future__ import annotations

from pathlib import Path

import typer


def serve(
    bundle: Path = typer.Argument(..., help="Model bundle folder."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on (0.0.0.0: every interface)."),
    port: int = typer.Option(8000, "--port", help="Port (0: any free port; the address is printed)."),
    db: str | None = typer.Option(None, "--db", help="Feedback database: an SQLAlchemy URL (e.g. "
                                     "postgresql+psycopg://user@host/db, extra postgres) or an SQLite file "
                                     "(default: feedback.db in ~/.local/share/retinalens/feedback)."),
    images: Path | None = typer.Option(None, "--images", help="Folder for the stored images "
                                          "(default: images/ beside the SQLite file; required for other databases)."),
    max_upload_mb: float = typer.Option(20.0, "--max-upload-mb", help="Largest request body (all files), in MB."),
    workers_threads: int = typer.Option(0, "--workers-threads", help="Model calls at a time, each on a batch of the "
                                         "images concurrent requests sent; the cores are shared among them "
                                         "(0: one call per core, each on one core)."),
    max_batch: int = typer.Option(4, "--max-batch", help="Most images in one model call."),
    log_level: str = typer.Option("info", "--log-level", help="critical | error | warning | info | debug."),
    allowed_host: list[str] = typer.Option([], "--allowed-host", help="A Host name this server answers for besides "
                                           "--host and localhost (repeatable; e.g. the name clients use)."),
    token: str | None = typer.Option(None, "--token", envvar="RETINALENS_TOKEN", show_envvar=True,
                                     help="API token (16+ characters): clients send 'Authorization: Bearer TOKEN', "
                                          "the page asks for it once. Required unless --host is a loopback address."),
    keep_originals: bool = typer.Option(False, "--keep-originals", help="Also keep each upload verbatim, metadata "
                                        "included, in originals/ (default: only its pixels, without metadata)."),
) -> None:
    """Web app and REST API: upload images, see class, referral, quality verdict and heat map; store clinicians' labels."""
    from ..serve.server import run_server
    from ..serve.service import ServeConfig

    run_server(ServeConfig(bundle=bundle, host=host, port=port, db=db, images=images, max_upload_mb=max_upload_mb,
                           threads=workers_threads, max_batch=max_batch, log_level=log_level.lower(),
                           allowed_hosts=tuple(allowed_host), token=token or None, keep_originals=keep_originals))

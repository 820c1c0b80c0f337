"""The feedback store: each analysed image, and each label a clinician confirmed or corrected.

Records live in a SQL database (an SQLite file by default; any SQLAlchemy URL, e.g. PostgreSQL),
images in a folder beside it, named by their sha256 (content-addressed: one file per distinct image,
whatever the client called it; no client name or path is ever used or stored). The web app hands in
the pixels re-encoded without metadata; `image_sha256` is the hash of the bytes the client sent (the
upload's identity), the file name the hash of the stored file. Originals are kept verbatim, in
`originals/` beside the images, only when asked.

Storage that cannot be written (disk full, read-only, a folder gone, the database down) raises
StorageError, which says what failed without a path, so that it can go to clients as it is.

Durability: an image is written (temp name, fsync, rename, folder fsync) before the row that refers
to it is committed, and the web app answers only after the commit. A server killed at any moment
therefore leaves every acknowledged record readable and every referenced image present; at worst an
image that no row refers to yet.

    store = FeedbackStore("sqlite:///feedback/feedback.db")      # images in feedback/images/
    for image, label, record in store.confirmed():                # the latest label per analysed image
        ...
"""

from __future__ import annotations

import errno
import hashlib
import os
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from .. import _deps
from .._deps import EXTRAS, install_hint
from .._io import atomic_write_bytes
from ..data.hashing import sha256_file
from ..errors import RetinaLensError

if TYPE_CHECKING:
    from ..bundle.store import Bundle


def require(module: str):
    """SQLAlchemy (or a driver) on first use, or one clear error naming the `serve` extra."""
    return _deps.require(module, "the feedback store", extra="serve")


@dataclass(frozen=True)
class ModelVersion:
    """Which model made a prediction: the sha256 of its bundle manifest (which hashes every weights file)."""

    sha256: str
    created: str

    @classmethod
    def of_bundle(cls, bundle: Bundle) -> ModelVersion:
        return cls(bundle.manifest_sha256, bundle.manifest.created)


class Confirmed(NamedTuple):
    image: Path  # the stored image file
    label: str  # the label the clinician confirmed or gave
    record: dict[str, Any]  # the whole record: prediction, probabilities, model version, times


class UnknownAnalysis(RetinaLensError):
    """Feedback names an analysis id the store does not hold."""


class StorageError(RetinaLensError):
    """The images folder or the database cannot be used. `full`: out of space (HTTP 507, not 503)."""

    def __init__(self, message: str, full: bool = False) -> None:
        super().__init__(message)
        self.full = full


_FULL = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}


def _os_problem(what: str, exc: BaseException) -> StorageError:
    # atomic_write_bytes raises RetinaLensError from None: the OSError with its errno is its context.
    os_exc = exc if isinstance(exc, OSError) else exc.__context__
    code = getattr(os_exc, "errno", None)
    reason = os.strerror(code) if code else "write failed"
    return StorageError(f"feedback storage unavailable: {what} cannot be written ({reason})", full=code in _FULL)


def database_url(db: str | Path) -> str:
    """A SQLAlchemy URL as is; a plain file path means an SQLite database there."""
    text = str(db)
    return text if "://" in text else f"sqlite:///{Path(text).expanduser().resolve()}"


def _sqlite_file(url: str) -> Path | None:
    """The SQLite file a URL names; None for a server database (PostgreSQL, ...)."""
    sa = require("sqlalchemy")
    try:
        parsed = sa.engine.make_url(url)
    except sa.exc.ArgumentError:
        raise RetinaLensError(f"--db {url.split('://')[0]}://...: not a database URL or file") from None
    if parsed.get_backend_name() != "sqlite":
        return None
    if parsed.database in (None, "", ":memory:") or parsed.query.get("mode") == "memory":
        raise RetinaLensError("an in-memory SQLite database keeps nothing: give --db a file or a server URL")
    return Path(parsed.database).expanduser()


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _iso(value: datetime | None) -> str | None:
    if value is None:
        return None
    return (value if value.tzinfo else value.replace(tzinfo=timezone.utc)).isoformat(timespec="milliseconds")


class FeedbackStore:
    """Analyses, feedback and content-addressed images. Thread-safe (one engine, a connection per call)."""

    def __init__(self, url: str | Path, images_dir: str | Path | None = None) -> None:
        sa = require("sqlalchemy")
        self.url = database_url(url)
        db_file = _sqlite_file(self.url)
        if not images_dir and db_file is None:
            raise RetinaLensError(f"{self.safe_url}: give a folder for the feedback images (--images DIR)")
        self.images_dir = Path(images_dir).expanduser() if images_dir else db_file.parent / "images"  # type: ignore[union-attr]
        try:
            self.images_dir.mkdir(parents=True, exist_ok=True)
            if db_file is not None:
                db_file.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise RetinaLensError(f"cannot create the feedback folders: {exc.strerror or exc}") from None
        self._tables(sa)
        try:
            if db_file is not None:
                # check_same_thread: the engine's pool hands connections to the server's threads.
                self.engine = sa.create_engine(self.url, connect_args={"timeout": 30, "check_same_thread": False})
                sa.event.listen(self.engine, "connect", _sqlite_pragmas)
            else:
                self.engine = sa.create_engine(self.url, pool_pre_ping=True)
            self.metadata.create_all(self.engine)
            self._add_original_column(sa)
        except ImportError as exc:  # the URL names a driver that is not installed (e.g. psycopg)
            hint = f"; {install_hint(exc.name)}" if (exc.name or "").split(".")[0] in EXTRAS else ""
            raise RetinaLensError(f"{self.safe_url}: database driver missing ({exc}{hint})") from None
        except sa.exc.SQLAlchemyError as exc:
            raise RetinaLensError(f"{self.safe_url}: cannot open the feedback database "
                                  f"({type(exc.orig if hasattr(exc, 'orig') else exc).__name__})") from None

    @property
    def safe_url(self) -> str:
        """The URL without its password, for messages."""
        return require("sqlalchemy").engine.make_url(self.url).render_as_string(hide_password=True)

    def _tables(self, sa: Any) -> None:
        self.metadata = sa.MetaData()
        self.analyses = sa.Table(
            "analyses", self.metadata,
            sa.Column("id", sa.String(32), primary_key=True),
            sa.Column("image", sa.String(80), nullable=False),  # file name in images_dir: <sha256>.<format>
            sa.Column("image_sha256", sa.String(64), nullable=False, index=True),  # of the bytes the client sent
            sa.Column("original", sa.String(80)),  # the verbatim upload in originals/, when kept
            sa.Column("model_sha256", sa.String(64), nullable=False),
            sa.Column("model_created", sa.String(40), nullable=False),
            sa.Column("label", sa.String(64)),  # None when the quality gate refused the image
            sa.Column("referral", sa.String(32)),
            sa.Column("probabilities", sa.JSON, nullable=False),
            sa.Column("gate", sa.JSON),
            sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        )
        self.feedback = sa.Table(
            "feedback", self.metadata,
            sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
            sa.Column("analysis_id", sa.String(32), sa.ForeignKey("analyses.id"), nullable=False, index=True),
            sa.Column("label", sa.String(64), nullable=False),
            sa.Column("confirmed", sa.Boolean, nullable=False),  # True: the prediction was right
            sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        )

    def _add_original_column(self, sa: Any) -> None:
        """Databases made before `original` existed get the column (nullable: nothing else changes)."""
        if "original" not in {c["name"] for c in sa.inspect(self.engine).get_columns("analyses")}:
            with self.engine.begin() as conn:
                conn.execute(sa.text("ALTER TABLE analyses ADD COLUMN original VARCHAR(80)"))

    @property
    def originals_dir(self) -> Path:
        return self.images_dir.parent / "originals"

    @contextmanager
    def _database(self) -> Iterator[None]:
        """Database failures of the server or the disk (not our own bugs) -> StorageError."""
        sa = require("sqlalchemy")
        try:
            yield
        except (sa.exc.OperationalError, sa.exc.InterfaceError) as exc:
            full = "full" in str(exc.orig).lower()  # SQLite: "database or disk is full"
            kind = type(exc.orig).__name__
            raise StorageError(f"feedback storage unavailable: the database cannot be used ({kind})", full) from None

    # -- writing -----------------------------------------------------------------------------------

    def store_image(self, data: bytes, extension: str, folder: Path | None = None) -> str:
        """Write an image under its content hash (atomic, durable); returns the file name."""
        folder = folder or self.images_dir
        name = f"{hashlib.sha256(data).hexdigest()}.{extension}"
        path = folder / name
        try:
            if not path.is_file():  # the same bytes are already there under this very name
                atomic_write_bytes(path, data)
                _fsync_dir(folder)  # the rename itself survives a power cut
        except (OSError, RetinaLensError) as exc:
            raise _os_problem(f"the {folder.name} folder", exc) from None
        return name

    def add_analysis(self, data: bytes, extension: str, result: dict[str, Any], model: ModelVersion, *,
                     upload_sha256: str | None = None, original: tuple[bytes, str] | None = None) -> str:
        """Store the image (and the verbatim `original` (bytes, extension) if given), then the prediction
        made on it; returns the new analysis id. `upload_sha256`: the hash of what the client sent, when
        `data` is a re-encoding of it."""
        image = self.store_image(data, extension)
        kept = self.store_image(*original, folder=self.originals_dir) if original else None
        analysis_id = uuid.uuid4().hex
        row = {"id": analysis_id, "image": image, "image_sha256": upload_sha256 or image.split(".")[0],
               "original": kept, "model_sha256": model.sha256, "model_created": model.created,
               "label": result.get("label"), "referral": result.get("referral"),
               "probabilities": result["probabilities"], "gate": result.get("gate"), "created_at": _now()}
        with self._database(), self.engine.begin() as conn:
            conn.execute(self.analyses.insert().values(**row))
        return analysis_id

    def add_feedback(self, analysis_id: str, label: str) -> dict[str, Any]:
        """Record a clinician's label for an analysis (committed before returning)."""
        sa = require("sqlalchemy")
        with self._database(), self.engine.begin() as conn:
            analysis = conn.execute(sa.select(self.analyses).where(self.analyses.c.id == analysis_id)).mappings().first()
            if analysis is None:
                raise UnknownAnalysis(f"no analysis with id {analysis_id!r}")
            classes = list(analysis["probabilities"])
            if label not in classes:
                raise RetinaLensError(f"label {label!r} is not one of the model's classes ({', '.join(classes)})")
            row = {"analysis_id": analysis_id, "label": label, "confirmed": label == analysis["label"],
                   "created_at": _now()}
            feedback_id = conn.execute(self.feedback.insert().values(**row)).inserted_primary_key[0]
        return {"id": int(feedback_id), "analysis_id": analysis_id, "label": label, "confirmed": row["confirmed"],
                "created_at": _iso(row["created_at"])}

    # -- reading -----------------------------------------------------------------------------------

    def analysis(self, analysis_id: str) -> dict[str, Any] | None:
        """One analysis record, with its latest feedback (None when there is none yet)."""
        sa = require("sqlalchemy")
        with self._database(), self.engine.connect() as conn:
            row = conn.execute(sa.select(self.analyses).where(self.analyses.c.id == analysis_id)).mappings().first()
            if row is None:
                return None
            fb = conn.execute(sa.select(self.feedback).where(self.feedback.c.analysis_id == analysis_id)
                              .order_by(self.feedback.c.id.desc()).limit(1)).mappings().first()
        record = _analysis_record(row)
        record["feedback"] = None if fb is None else {"id": fb["id"], "label": fb["label"], "confirmed": fb["confirmed"],
                                                      "created_at": _iso(fb["created_at"])}
        return record

    def image_path(self, record: dict[str, Any]) -> Path:
        return self.images_dir / record["image"]

    def read_image(self, record: dict[str, Any]) -> bytes:
        try:
            return self.image_path(record).read_bytes()
        except OSError as exc:
            raise StorageError(f"feedback storage unavailable: the stored image of analysis {record['analysis_id']} "
                               f"cannot be read ({exc.strerror or type(exc).__name__})") from None

    def health(self) -> str | None:
        """What keeps the store from taking new analyses (None: nothing): a probe file written, synced and
        removed in the images folder, and a round trip to the database."""
        sa = require("sqlalchemy")
        try:
            with tempfile.TemporaryFile(dir=self.images_dir, prefix=".probe.") as probe:
                probe.write(b"probe")
                probe.flush()
                os.fsync(probe.fileno())
        except OSError as exc:
            return str(_os_problem("the images folder", exc))
        try:
            with self._database(), self.engine.connect() as conn:
                conn.execute(sa.text("SELECT 1"))
        except StorageError as exc:
            return str(exc)
        return None

    def confirmed(self) -> list[Confirmed]:
        """(image path, label, record) for every analysis a clinician labelled, the latest label each."""
        sa = require("sqlalchemy")
        f, a = self.feedback, self.analyses
        latest = sa.select(sa.func.max(f.c.id)).group_by(f.c.analysis_id)
        query = (sa.select(f.c.id.label("feedback_id"), f.c.label.label("feedback_label"), f.c.confirmed,
                           f.c.created_at.label("feedback_at"), a)
                 .join(a, a.c.id == f.c.analysis_id).where(f.c.id.in_(latest)).order_by(f.c.id))
        with self.engine.connect() as conn:
            rows = conn.execute(query).mappings().all()
        out = []
        for row in rows:
            record = _analysis_record(row) | {"feedback_id": row["feedback_id"], "confirmed": row["confirmed"],
                                              "feedback_at": _iso(row["feedback_at"])}
            record["label"] = row["feedback_label"]
            out.append(Confirmed(self.image_path(record), row["feedback_label"], record))
        return out

    def counts(self) -> dict[str, int]:
        sa = require("sqlalchemy")
        with self.engine.connect() as conn:
            return {name: int(conn.execute(sa.select(sa.func.count()).select_from(table)).scalar_one())
                    for name, table in (("analyses", self.analyses), ("feedback", self.feedback))}

    def verify(self) -> list[str]:
        """Problems found: referenced images missing or not matching the hash they are named by (empty: consistent)."""
        sa = require("sqlalchemy")
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(self.analyses.c.id, self.analyses.c.image, self.analyses.c.original)).all()
        problems = []
        for analysis_id, *files in rows:
            for folder, name in zip((self.images_dir, self.originals_dir), files):
                if name is None:
                    continue
                path = folder / name
                if not path.is_file():
                    problems.append(f"analysis {analysis_id}: {folder.name} file {name} is missing")
                elif sha256_file(path) != name.split(".")[0]:
                    problems.append(f"analysis {analysis_id}: {folder.name} file {name} does not match its hash")
        return problems

    def close(self) -> None:
        self.engine.dispose()

    def __enter__(self) -> FeedbackStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _analysis_record(row: Any) -> dict[str, Any]:
    """A database row -> the JSON-ready record the API returns and the retrain step reads."""
    return {"analysis_id": row["id"], "image": row["image"], "image_sha256": row["image_sha256"],
            "original": row["original"],
            "model_sha256": row["model_sha256"], "model_created": row["model_created"],
            "predicted": row["label"], "referral": row["referral"], "probabilities": dict(row["probabilities"]),
            "gate": row["gate"], "analysed_at": _iso(row["created_at"])}


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    """WAL: readers never block the writer; synchronous=FULL: a commit is on disk when it returns."""
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=FULL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # some platforms cannot open folders; the file itself was fsynced
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)

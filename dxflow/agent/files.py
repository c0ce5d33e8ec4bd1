"""``/api/files``: list, stat, download, upload, mkdir, move and delete inside the allowed roots.

Every path goes through :class:`dxflow.agent.paths.Roots` first. Downloads are sent
with ``sendfile`` by gunicorn (``wsgi.file_wrapper``) and honour ``Range: bytes=N-``
so a broken transfer resumes. Uploads stream into a hidden temporary file in the
target's own folder, which is fsynced and renamed over the real name only once the
whole body has arrived: a broken upload never leaves a partial file under that name.

An upload that names a ``resume`` key writes to ``.dxflow-upload-KEY.part`` in that folder
instead, from byte ``offset`` on, and keeps it (fsynced) when the body breaks off, so the
next upload with the same key sends only the rest: the client learns where to go on by a
``stat`` of that name. When the body is complete the whole file is hashed, checked against
the ``sha256`` the client sent (a mismatch drops the partial file and leaves the target as
it was), and renamed over the target.
"""

from __future__ import annotations

import errno
import fcntl
import functools
import hashlib
import os
import re
import shutil
import stat
import tempfile
import time
import unicodedata
from pathlib import Path
from urllib.parse import quote

from flask import Blueprint, Flask, current_app, jsonify, request
from werkzeug.exceptions import ClientDisconnected, HTTPException
from werkzeug.http import http_date
from werkzeug.wsgi import wrap_file

from dxflow import audit
from dxflow.agent.paths import Roots, job_tmpdir, open_regular
from dxflow.errors import AccessDenied, NotFound, UsageError

bp = Blueprint("files", __name__)

CHUNK = 1024 * 1024
UPLOAD_PREFIX = ".dxflow-upload-"
RESUME_SUFFIX = ".part"
PART_LOCK_WAIT = 30.0  # seconds an upload waits for the request of a broken try to let go of the partial file
RESUME_KEY = re.compile(r"[A-Za-z0-9_-]{16,64}")  # the client's name for one source: no path, no dot


class InsufficientStorage(HTTPException):
    code = 507
    description = "no space left on the node's file system (or over your quota)"


def init_app(app: Flask) -> None:
    templates = app.config.get("FILE_SCRATCH_ROOTS")
    node_local = app.config.get("FILE_NODE_LOCAL_ROOTS")
    if templates is None or node_local is None:
        from dxflow.config import SiteConfig
        site = SiteConfig.load()
        templates = site.scratch_roots if templates is None else templates
        node_local = site.node_local_roots if node_local is None else node_local
    state = app.config["AGENT"]
    app.config["FILE_ROOTS"] = Roots.for_agent(state, list(templates), list(node_local), job_tmpdir(state))
    app.config.setdefault("FILE_UMASK", _umask())


def _umask() -> int:
    """This process's umask, read without os.umask (which would race with other threads)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return 0o022


def roots() -> Roots:
    return current_app.config["FILE_ROOTS"]


def fs_errors(view):
    """Turn what the file system says into the API's errors (404, 403, 400, 507)."""
    @functools.wraps(view)
    def wrapper(*args, **kwargs):
        try:
            return view(*args, **kwargs)
        except FileNotFoundError as e:
            raise NotFound(f"{e.filename or 'path'}: no such file or folder") from e
        except PermissionError as e:
            raise AccessDenied(f"{e.filename or 'path'}: permission denied by the file system") from e
        except shutil.SpecialFileError as e:  # a fifo moved to another file system: copying would wait
            raise UsageError(str(e)) from e
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise InsufficientStorage() from e
            if e.errno == errno.EROFS:
                raise AccessDenied(f"{e.filename or 'path'}: {e.strerror}") from e
            if e.errno in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR, errno.EISDIR, errno.ENAMETOOLONG,
                           errno.EINVAL, errno.ELOOP, errno.EXDEV, errno.EBUSY, errno.EMLINK, errno.ETXTBSY,
                           errno.EFBIG):
                raise UsageError(f"{e.filename or 'path'}: {e.strerror}") from e
            raise  # EIO and the like: a real fault, logged as one
    return wrapper


def _flag(name: str, data: dict | None = None) -> bool:
    value = data.get(name, False) if data is not None else request.args.get(name, "")
    if isinstance(value, bool):
        return value
    return str(value).lower() in ("1", "true", "yes", "on")


def _json_body() -> dict:
    data = request.get_json(silent=True)
    if not isinstance(data, dict):
        raise UsageError("expected a JSON object body")
    return data


def _text(data: dict, key: str) -> str:
    value = data.get(key)
    if not isinstance(value, str) or not value:
        raise UsageError(f"{key!r} (a path) is required")
    return value


def entry_type(st: os.stat_result) -> str:
    if stat.S_ISLNK(st.st_mode):
        return "link"
    if stat.S_ISDIR(st.st_mode):
        return "dir"
    if stat.S_ISREG(st.st_mode):
        return "file"
    return "other"   # fifo, socket, device


def entry(name: str, st: os.stat_result) -> dict:
    return {"name": name, "type": entry_type(st), "size": st.st_size, "mtime": st.st_mtime,
            "mode": stat.S_IMODE(st.st_mode)}


def sha256_of(path: Path) -> str:
    with open_regular(path, follow=False) as f:  # a resolved path: no symlink left in it
        return hashlib.file_digest(f, "sha256").hexdigest()


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# -- reading ------------------------------------------------------------------------
@bp.get("/api/files/roots")
def list_roots():
    return jsonify([r.to_dict() for r in roots().all()])


@bp.get("/api/files")
@fs_errors
def list_folder():
    folder = roots().resolve(request.args.get("path"))
    if not folder.is_dir():
        if folder.exists() or folder.is_symlink():
            raise UsageError(f"{folder} is not a folder: use /api/files/stat or /api/files/content")
        raise NotFound(f"{folder}: no such folder")
    entries = []
    with os.scandir(folder) as it:
        for e in it:
            try:
                st = e.stat(follow_symlinks=False)
            except FileNotFoundError:  # removed while we listed
                continue
            if roots().visible(folder, st):  # in /tmp, only the user's own
                entries.append(entry(e.name, st))
    entries.sort(key=lambda x: x["name"])
    return jsonify(path=str(folder), entries=entries)


@bp.get("/api/files/stat")
@fs_errors
def stat_path():
    path = roots().resolve(request.args.get("path"))
    st = path.stat()
    body = {"path": str(path), **entry(path.name, st)}
    if _flag("sha256") and stat.S_ISREG(st.st_mode):
        body["sha256"] = sha256_of(path)
    return jsonify(body)


@bp.get("/api/files/content")
@fs_errors
def download():
    path = roots().resolve(request.args.get("path"))
    f = open_regular(path, follow=False)  # a fifo or a device is refused, never waited on
    try:
        st = os.fstat(f.fileno())
        size = st.st_size
        start, stop, status = 0, size, 200
        rng = request.range  # None unless a valid Range header was sent
        if rng is not None and rng.units == "bytes" and len(rng.ranges) == 1:
            span = rng.range_for_length(size)
            if span is None:
                f.close()
                resp = jsonify(error="range_not_satisfiable", message=f"{path} has {size} bytes: nothing "
                               f"to send from {rng.ranges[0][0]} on")
                resp.status_code = 416
                resp.headers["Content-Range"] = f"bytes */{size}"
                return resp
            start, stop = span
            status = 206
    except BaseException:
        f.close()
        raise
    f.seek(start)
    if stop == size:
        # to the end: gunicorn hands the open file to sendfile(2) from the current offset
        body = wrap_file(request.environ, f, buffer_size=CHUNK)
    else:
        body = _read_span(f, stop - start)
    resp = current_app.response_class(body, status=status, mimetype="application/octet-stream",
                                      direct_passthrough=True)
    resp.content_length = stop - start
    resp.headers["Accept-Ranges"] = "bytes"
    resp.headers["Last-Modified"] = http_date(st.st_mtime)
    resp.headers["Content-Disposition"] = content_disposition(path.name)
    if status == 206:
        resp.headers["Content-Range"] = f"bytes {start}-{stop - 1}/{size}"
    return resp


def content_disposition(name: str) -> str:
    """``attachment`` with the file's name; a name beyond ASCII goes in ``filename*`` (RFC 6266), as
    headers must stay Latin-1."""
    try:
        name.encode("ascii")
    except UnicodeError:
        plain = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode() or "download"
        return f'attachment; filename="{_quoted(plain)}"; filename*=UTF-8\'\'{quote(os.fsencode(name), safe="")}'
    return f'attachment; filename="{_quoted(name)}"'


def _quoted(text: str) -> str:
    return "".join(c if c.isprintable() and c not in '"\\' else "_" for c in text)


def _read_span(f, length: int):
    try:
        while length > 0:
            chunk = f.read(min(CHUNK, length))
            if not chunk:
                return
            length -= len(chunk)
            yield chunk
    finally:
        f.close()


# -- writing ------------------------------------------------------------------------
@bp.put("/api/files/content")
@fs_errors
def upload():
    r = roots()
    target = r.resolve(request.args.get("path"))
    overwrite = _flag("overwrite")
    if r.is_root(target) or target.is_dir():
        raise UsageError(f"{target} is a folder: name the file to write inside it")
    existing = target.exists()
    if existing and not overwrite:
        raise UsageError(f"{target} exists: pass overwrite=1 to replace it")
    folder = target.parent
    if not folder.is_dir():
        raise NotFound(f"folder {folder} does not exist: make it first (POST /api/files/mkdir)")
    mode = (stat.S_IMODE(target.stat().st_mode) if existing
            else 0o666 & ~current_app.config["FILE_UMASK"])
    expected = request.content_length
    key = request.args.get("resume")
    audit.record("write", str(target), current_app.config["AGENT"], request.environ, overwrite=existing)
    if key is not None:
        return _upload_resumable(target, key, mode, existing, overwrite)
    fd, tmp_name = tempfile.mkstemp(prefix=UPLOAD_PREFIX, dir=folder)
    tmp = Path(tmp_name)
    digest = hashlib.sha256()
    size = 0
    try:
        with os.fdopen(fd, "wb") as out:
            os.fchmod(out.fileno(), mode)  # before the fsync, which makes it last with the bytes
            size = _write_body(out, digest, expected)
            if expected is not None and size != expected:
                raise UsageError(f"upload broken off after {size} of {expected} bytes: "
                                 f"{target} was left as it was")
        _put_in_place(tmp, target, overwrite)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return jsonify(path=str(target), size=size, sha256=digest.hexdigest()), (200 if existing else 201)


def _receive(out, digest, expected: int | None) -> int:
    """Copy the request body into ``out`` (hashing it): the bytes received, at most one chunk past ``expected``.

    With a Content-Length, a body that breaks off ends the copy early (the caller compares the
    count with ``expected``); without one, the break is raised: nothing else would tell it."""
    size = 0
    stream = request.stream
    while True:
        try:
            chunk = stream.read(CHUNK)
        except (OSError, ClientDisconnected):
            if expected is None:
                raise
            break
        if not chunk:
            break
        out.write(chunk)
        digest.update(chunk)
        size += len(chunk)
        if expected is not None and size > expected:
            break
    return size


def _write_body(out, digest, expected: int | None) -> int:
    """:func:`_receive` into ``out``, then flush and fsync what arrived (all of it, or what came before
    a break); the bytes received."""
    try:
        return _receive(out, digest, expected)
    finally:
        out.flush()
        os.fsync(out.fileno())


def _put_in_place(written: Path, target: Path, overwrite: bool) -> None:
    """The complete, fsynced file ``written`` (in ``target``'s folder) becomes ``target``: replacing
    it only with ``overwrite``; the folder is fsynced so that the new name survives a crash too."""
    if overwrite:
        os.replace(written, target)
    else:
        try:
            os.link(written, target)  # fails if someone made the file meanwhile: never clobber it
        except FileExistsError as e:
            raise UsageError(f"{target} exists: pass overwrite=1 to replace it") from e
        written.unlink()
    _fsync_dir(target.parent)


def resume_name(target: Path, key: str) -> Path:
    """Where an upload under resume KEY keeps its bytes until they are complete."""
    return target.parent / f"{UPLOAD_PREFIX}{key}{RESUME_SUFFIX}"


def _lock_part(fd: int, part: Path, wait: float = PART_LOCK_WAIT) -> None:
    """Hold the partial file alone: the request of a try that broke off may still be writing to it."""
    deadline = time.monotonic() + wait
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() > deadline:
                raise UsageError(f"another upload writes to {part}: try again when it has ended") from None
            time.sleep(0.1)


def _upload_resumable(target: Path, key: str, mode: int, existing: bool, overwrite: bool):
    """The body is the source from byte ``offset`` on: appended to the kept partial file, which
    becomes the target once complete and matching ``sha256``; kept (fsynced) when the body breaks off."""
    if not RESUME_KEY.fullmatch(key):
        raise UsageError("resume: expected 16-64 letters, digits, '-' or '_'")
    try:
        offset = int(request.args.get("offset", "0"))
    except ValueError:
        raise UsageError("offset: expected a number of bytes") from None
    want = (request.args.get("sha256") or "").lower()
    expected = request.content_length
    if offset < 0 or expected is None:
        raise UsageError("a resumable upload needs offset >= 0 and a Content-Length")
    part = resume_name(target, key)
    # O_NOFOLLOW: the name is ours; a symlink planted there must not redirect the write
    try:  # only a start from byte 0 makes the file: a later offset continues one that is there
        fd = os.open(part, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC | (0 if offset else os.O_CREAT), 0o600)
    except FileNotFoundError:
        raise UsageError(f"resume from byte {offset}: no partial upload {part} (it was completed or "
                         "removed meanwhile); send from byte 0") from None
    with os.fdopen(fd, "r+b") as out:
        _lock_part(out.fileno(), part)
        have = os.fstat(out.fileno())
        if not stat.S_ISREG(have.st_mode):
            raise UsageError(f"{part} is not a regular file: remove it and retry")
        if have.st_size < offset:
            raise UsageError(f"resume from byte {offset}: {part} holds only {have.st_size} bytes; "
                             "stat it and send from there")
        out.truncate(offset)
        out.seek(offset)
        size = _write_body(out, hashlib.sha256(), expected)  # kept for the next try, even when it broke off
        if size != expected:
            raise UsageError(f"upload broken off after {offset + size} of {offset + expected} bytes: they are "
                             f"kept in {part} for the next try; {target} was left as it was")
        out.seek(0)
        digest = hashlib.file_digest(out, "sha256")
        if want and digest.hexdigest() != want:
            part.unlink(missing_ok=True)
            raise UsageError(f"the uploaded bytes hash to {digest.hexdigest()[:16]}…, not {want[:16]}…: "
                             f"dropped; {target} was left as it was, send the whole file again")
        os.fchmod(out.fileno(), mode)
    _put_in_place(part, target, overwrite)
    return jsonify(path=str(target), size=offset + size, sha256=digest.hexdigest()), (200 if existing else 201)


@bp.post("/api/files/mkdir")
@fs_errors
def mkdir():
    data = _json_body()
    path = roots().resolve(_text(data, "path"))
    parents = _flag("parents", data)
    if parents:
        path.mkdir(parents=True, exist_ok=True)
        if not path.is_dir():
            raise UsageError(f"{path} exists and is not a folder")
    else:
        path.mkdir()
    audit.record("mkdir", str(path), current_app.config["AGENT"], request.environ)
    return jsonify(path=str(path)), 201


@bp.post("/api/files/move")
@fs_errors
def move():
    data = _json_body()
    r = roots()
    src = r.resolve(_text(data, "src"), follow=False)
    dst = r.resolve(_text(data, "dst"), follow=False)
    overwrite = _flag("overwrite", data)
    for p in (src, dst):
        if r.is_root(p):
            raise AccessDenied(f"{p} is one of the agent's roots: it cannot be moved or replaced")
    if not src.exists() and not src.is_symlink():
        raise NotFound(f"{src}: no such file or folder")
    if src == dst:
        return jsonify(src=str(src), dst=str(dst))
    if (dst.exists() or dst.is_symlink()) and not overwrite:
        raise UsageError(f"{dst} exists: pass \"overwrite\": true to replace it")
    if not dst.parent.is_dir():
        raise NotFound(f"folder {dst.parent} does not exist: make it first")
    try:
        os.replace(src, dst)
    except OSError as e:
        if e.errno != errno.EXDEV:
            raise
        # another file system (home -> scratch): copy then delete; symlinks are moved as links
        if dst.is_dir() and not dst.is_symlink():
            raise UsageError(f"{dst} is a folder on another file system: delete it first") from e
        shutil.move(str(src), str(dst))
    audit.record("move", str(src), current_app.config["AGENT"], request.environ, to=str(dst))
    return jsonify(src=str(src), dst=str(dst))


@bp.delete("/api/files")
@fs_errors
def delete():
    r = roots()
    path = r.resolve(request.args.get("path"), follow=False)
    if not request.args.get("path") or r.is_root(path):
        raise AccessDenied(f"{path} is one of the agent's roots: it cannot be deleted")
    st = path.lstat()
    if stat.S_ISDIR(st.st_mode):
        if _flag("recursive"):
            shutil.rmtree(path)  # fd-based: never follows a symlink out of the tree
        else:
            try:
                path.rmdir()
            except OSError as e:
                if e.errno == errno.ENOTEMPTY:
                    raise UsageError(f"{path} is a folder that is not empty: pass recursive=1") from e
                raise
    else:
        path.unlink()  # a symlink is removed itself, never what it points to
    audit.record("delete", str(path), current_app.config["AGENT"], request.environ)
    return jsonify(path=str(path), deleted=True)


# -- OpenAPI fragment (merged by dxflow.agent.openapi) -----------------------------------
def _json(schema: dict, description: str = "OK") -> dict:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _error(description: str) -> dict:
    return _json({"$ref": "#/components/schemas/Error"}, description)


def _flag_param(name: str, description: str) -> dict:
    return {"name": name, "in": "query", "required": False, "description": description,
            "schema": {"type": "string", "enum": ["0", "1"]}}


_PATH = {"name": "path", "in": "query", "required": False, "schema": {"type": "string"},
         "description": "relative to the job's work dir (the default), or absolute inside a root"}
_ERRORS = {
    "400": _error("bad input: a NUL byte, a name over 255 bytes, not a folder, exists already …"),
    "403": _error("outside the allowed roots (.., an absolute path elsewhere, a symlink pointing out), "
                  "or refused by the file system"),
    "404": _error("no such file or folder"),
}
_ENTRY = {"type": "object", "properties": {
    "name": {"type": "string"},
    "type": {"type": "string", "enum": ["file", "dir", "link", "other"],
             "description": "link: a symlink itself (listings do not follow them); other: fifo, socket, device"},
    "size": {"type": "integer"}, "mtime": {"type": "number", "description": "seconds since the epoch"},
    "mode": {"type": "integer", "description": "permission bits (e.g. 420 = 0o644)"}}}
_BINARY = {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}

OPENAPI = {
    "/api/files/roots": {"get": {
        "summary": "the allowed roots: the job's work dir, the user's home, the site's scratch, the node's "
                   "own scratch (node-local: shared by the node's users, only your own files there are served)",
        "operationId": "files_roots", "tags": ["files"],
        "responses": {"200": _json({"type": "array", "items": {"type": "object", "properties": {
            "name": {"type": "string", "enum": ["workdir", "home", "scratch", "node-local"]},
            "path": {"type": "string"}}}})}}},
    "/api/files": {
        "get": {"summary": "list a folder", "operationId": "files_list", "tags": ["files"], "parameters": [_PATH],
                "responses": {"200": _json({"type": "object", "properties": {
                    "path": {"type": "string"}, "entries": {"type": "array", "items": _ENTRY}}}), **_ERRORS}},
        "delete": {"summary": "delete a file, a symlink (never what it points to), or a folder with recursive=1",
                   "operationId": "files_delete", "tags": ["files"],
                   "parameters": [_PATH, _flag_param("recursive", "delete a folder and everything in it")],
                   "responses": {"200": _json({"type": "object", "properties": {
                       "path": {"type": "string"}, "deleted": {"type": "boolean"}}}), **_ERRORS}}},
    "/api/files/stat": {"get": {
        "summary": "one entry (symlinks followed), plus its sha256 with sha256=1",
        "operationId": "files_stat", "tags": ["files"],
        "parameters": [_PATH, _flag_param("sha256", "add the sha256 of a file's content")],
        "responses": {"200": _json({"allOf": [_ENTRY, {"type": "object", "properties": {
            "path": {"type": "string"}, "sha256": {"type": "string"}}}]}), **_ERRORS}}},
    "/api/files/content": {
        "get": {"summary": "download a file, streamed; Range: bytes=N- resumes it",
                "operationId": "files_download", "tags": ["files"],
                "parameters": [_PATH, {"name": "Range", "in": "header", "required": False,
                                       "schema": {"type": "string"}, "example": "bytes=1048576-"}],
                "responses": {"200": {"description": "the whole file", "content": _BINARY},
                              "206": {"description": "the range asked for (Content-Range says which)",
                                      "content": _BINARY},
                              "416": _error("the range starts past the end of the file"), **_ERRORS}},
        "put": {"summary": "upload the body: streamed to a temporary file in the same folder, fsynced, "
                           "then renamed (a broken upload leaves nothing under the name)",
                "operationId": "files_upload", "tags": ["files"],
                "parameters": [_PATH, _flag_param("overwrite", "replace an existing file"),
                               {"name": "resume", "in": "query", "required": False, "schema": {"type": "string"},
                                "description": "a key naming the source (16-64 of A-Za-z0-9_-): the bytes go to "
                                               "the kept partial file .dxflow-upload-KEY.part in the target's "
                                               "folder, so a broken upload resumes"},
                               {"name": "offset", "in": "query", "required": False,
                                "schema": {"type": "integer", "minimum": 0},
                                "description": "with resume: the body starts at this byte of the source "
                                               "(at most the partial file's size)"},
                               {"name": "sha256", "in": "query", "required": False, "schema": {"type": "string"},
                                "description": "with resume: the whole file's sha256; a mismatch drops the "
                                               "partial file and leaves the target as it was"}],
                "requestBody": {"required": True, "content": _BINARY},
                "responses": {"200": _json({"type": "object", "properties": {
                    "path": {"type": "string"}, "size": {"type": "integer"}, "sha256": {"type": "string"}}},
                    "replaced a file"),
                    "201": _json({"type": "object"}, "created (same body as 200)"),
                    "507": _error("no space left on the file system, or over quota"), **_ERRORS}}},
    "/api/files/mkdir": {"post": {
        "summary": "make a folder", "operationId": "files_mkdir", "tags": ["files"],
        "requestBody": {"required": True, "content": {"application/json": {"schema": {
            "type": "object", "required": ["path"],
            "properties": {"path": {"type": "string"}, "parents": {"type": "boolean"}}}}}},
        "responses": {"201": _json({"type": "object", "properties": {"path": {"type": "string"}}}, "made"),
                      **_ERRORS}}},
    "/api/files/move": {"post": {
        "summary": "move or rename (a symlink is moved itself)", "operationId": "files_move", "tags": ["files"],
        "requestBody": {"required": True, "content": {"application/json": {"schema": {
            "type": "object", "required": ["src", "dst"],
            "properties": {"src": {"type": "string"}, "dst": {"type": "string"},
                           "overwrite": {"type": "boolean"}}}}}},
        "responses": {"200": _json({"type": "object", "properties": {
            "src": {"type": "string"}, "dst": {"type": "string"}}}), **_ERRORS}}},
}

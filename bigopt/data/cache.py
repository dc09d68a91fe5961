"""A content-addressed cache of prepared data: a second run with the same inputs skips the
data stage.

The key (``cache_key``) is a hash of what decides the shards: the source's files (paths, sizes
and modification times, listed through pyarrow on local disk or S3: no file is read), the data
section of the spec (``data.engine`` and ``data.cache`` left out: they change where the work
runs, not what it writes), the context, task and columns, and the code that prepares the data
(the source of ``bigopt.data`` and the versions of the libraries whose output lands in the
shards). The same idea as Hugging Face ``datasets``' fingerprinted cache, kept under the job's
storage so every machine that shares the storage (local disk or S3) shares the entries:

    <storage>/cache/data/<key>/      the data stage's folder (shards, rejects, ...)
    <storage>/cache/data/<key>/entry-manifest.json, entry-artifact.json   its manifest and
                                     artifact, renamed: a run dir's files keep names of their
                                     own under a storage (scripts find runs by manifest.json)
    <storage>/cache/data/<key>/COMPLETE.json   written last: the entry's files and their sizes

An entry without ``COMPLETE.json`` (a stage killed while publishing) or whose files do not match
it is never read, and is overwritten by the next run that misses. On a hit the run's ``data/``
folder holds ``cache.json`` and a copy of the manifest saying so, and its data artifact points
at the entry's shards.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import importlib.metadata
import json
import logging
import os
import signal
import time
from pathlib import Path
from typing import Any

from bigopt.runtime import RunDir, filesystem_for

log = logging.getLogger("bigopt")

CACHE_PREFIX = "cache/data"
MARKER = "COMPLETE.json"
MANIFEST = "entry-manifest.json"
ARTIFACT = "entry-artifact.json"
#: a fault-injection point for tests: kill this process after copying an entry's files and
#: before its marker, as a crash or a preempted node would
FAILPOINT_ENV = "BIGOPT_FAILPOINT"
#: libraries whose output ends up in the shards
LIBRARIES = ("pyarrow", "numpy", "tokenizers", "datasketch", "scikit-learn", "cleanlab", "torch")


def cache_root(storage: str) -> RunDir:
    return RunDir(f"{storage.rstrip('/')}/{CACHE_PREFIX}")


def code_version() -> str:
    """A hash of ``bigopt.data``'s source and the versions of the libraries it writes with:
    changing a step's code (or its library) is a miss."""
    digest = hashlib.sha256()
    package = Path(__file__).parent
    for path in sorted(package.rglob("*.py")):
        digest.update(path.relative_to(package).as_posix().encode())
        digest.update(path.read_bytes())
    for name in LIBRARIES:
        try:
            digest.update(f"{name}=={importlib.metadata.version(name)}".encode())
        except importlib.metadata.PackageNotFoundError:
            digest.update(f"{name}: absent".encode())
    return digest.hexdigest()


def source_listing(source: Any) -> list[tuple[str, int, int]]:
    """(path, size, mtime in ns) of every file the source reads, sorted: for a text tree the
    files its reader selects (``bigopt.data.text.list_files``: include/exclude/max_files, so an
    unrelated file in the tree, e.g. a package installed into the stdlib's site-packages, is
    not a miss), else every file under the source's path."""
    import pyarrow.fs as pafs

    if source.kind == "digits":  # scikit-learn's bundled copy
        import sklearn.datasets

        root = os.path.join(os.path.dirname(sklearn.datasets.__file__), "data", "digits.csv.gz")
    elif source.kind == "text_tree":
        from bigopt.data.text import list_files, resolve_root

        root = str(resolve_root(source.path))
        fs, base = filesystem_for(root)
        rels = list_files(resolve_root(source.path), source.include, source.exclude,
                          source.max_files)
        infos = fs.get_file_info([f"{base}/{rel}" for rel in rels])
        return sorted((i.path, i.size or 0, i.mtime_ns or 0) for i in infos)
    else:
        root = source.path
    fs, path = filesystem_for(root)
    info = fs.get_file_info(path)
    infos = ([info] if info.type == pafs.FileType.File else
             fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True)))
    return sorted((i.path, i.size or 0, i.mtime_ns or 0) for i in infos
                  if i.type == pafs.FileType.File)


def cache_key(job: Any) -> str:
    data = job.spec.data
    listing = hashlib.sha256(json.dumps(source_listing(data.source)).encode()).hexdigest()
    key = json.dumps({"data": data.model_dump(mode="json", exclude={"engine", "cache"}),
                      "context": job.context, "task": job.task, "columns": list(job.columns),
                      "source_files": listing, "code": code_version()}, sort_keys=True)
    return hashlib.sha256(key.encode()).hexdigest()[:32]


def _files_under(run: RunDir) -> dict[str, int]:
    """Relative path -> size of every file in a folder."""
    import pyarrow.fs as pafs

    fs, base = run.fs, run.path
    infos = fs.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True))
    return {i.path[len(base):].lstrip("/"): i.size or 0 for i in infos
            if i.type == pafs.FileType.File}


def complete_entry(entry: RunDir) -> dict[str, Any] | None:
    """The entry's marker when the entry is whole (every listed file there, same size)."""
    if not entry.exists(MARKER):
        return None
    marker = entry.read_json(MARKER)
    present = _files_under(entry)
    if any(present.get(name) != size for name, size in marker["files"].items()):
        log.warning("data cache: entry %s does not match its marker: ignored", entry.uri)
        return None
    return marker


def publish(stage_dir: RunDir, entry: RunDir, artifact: Any, key: str) -> None:
    """Copy the data stage's folder into the entry, then write the marker (last)."""
    import pyarrow.fs as pafs

    files = {name: size for name, size in _files_under(stage_dir).items()
             if name != "manifest.json"}
    for name in sorted(files):
        entry.fs.create_dir(entry.sub(name).rsplit("/", 1)[0], recursive=True)
        pafs.copy_files(stage_dir.sub(name), entry.sub(name), source_filesystem=stage_dir.fs,
                        destination_filesystem=entry.fs)
    manifest = stage_dir.read_text("manifest.json")
    entry.write_text(MANIFEST, manifest)
    files[MANIFEST] = len(manifest.encode())
    moved = artifact.model_copy(update={
        "uri": entry.uri, "manifest": entry.uri_of(MANIFEST),
        "splits": {name: s.model_copy(update={"uri": entry.uri_of(name)})
                   for name, s in artifact.splits.items()}})
    text = moved.model_dump_json(indent=1)
    entry.write_text(ARTIFACT, text)
    files[ARTIFACT] = len(text.encode())
    if os.environ.get(FAILPOINT_ENV) == "cache-publish":
        os.kill(os.getpid(), signal.SIGKILL)
    entry.write_text(MARKER, json.dumps({"key": key, "files": files, "from_run": artifact.run,
                                         "created": _dt.datetime.now(_dt.timezone.utc).isoformat()},
                                        indent=1))


def cached_data_stage(job: Any, inputs: dict[str, Any], run: RunDir, options: Any = None) -> Any:
    """The data stage through the cache (stage table entry): reuse a complete entry with the
    same key, or prepare the data and publish it as a new entry."""
    from bigopt.artifacts import DataArtifact
    from bigopt.data.prepare import data_stage

    if not job.spec.data.cache:
        return data_stage(job, inputs, run, options)
    started = time.time()
    key = cache_key(job)
    entry = cache_root(job.spec.storage).stage(key)
    marker = complete_entry(entry)
    if marker is not None:
        cached = DataArtifact.model_validate(entry.read_json(ARTIFACT))
        manifest = entry.read_json(MANIFEST)
        for step in manifest.get("steps") or []:  # run-relative paths of the preparing run
            rel = step.get("rejects")
            if rel and rel.startswith(f"{run.name}/"):
                step["rejects"] = entry.uri_of(rel[len(run.name) + 1:])
        manifest["cache"] = info = {"hit": True, "key": key, "entry": entry.uri,
                                    "prepared_in": marker.get("from_run"),
                                    "seconds": round(time.time() - started, 3)}
        run.write_text("manifest.json", json.dumps(manifest, indent=1))
        run.write_text("cache.json", json.dumps(info, indent=1))
        log.info(f"data: cache hit {key[:12]}: prepared data reused from {entry.uri} "
             f"({manifest.get('rows_kept')} rows), preparation skipped")
        return cached.model_copy(update={"stage": run.name, "run": run.parent.uri,
                                         "manifest": run.uri_of("manifest.json")})
    log.info(f"data: cache miss {key[:12]}: preparing (entry {entry.uri})")
    artifact = data_stage(job, inputs, run, options)
    publish(run, entry, artifact, key)
    run.write_text("cache.json", json.dumps({"hit": False, "key": key, "entry": entry.uri}, indent=1))
    return artifact


def entries(storage: str) -> list[dict[str, Any]]:
    """Every entry under the storage's cache: key, complete or not, bytes, created."""
    import pyarrow.fs as pafs

    root = cache_root(storage)
    infos = root.fs.get_file_info(pafs.FileSelector(root.path, recursive=False,
                                                    allow_not_found=True))
    out = []
    for info in sorted(infos, key=lambda i: i.path):
        if info.type != pafs.FileType.Directory:
            continue
        entry = root.stage(os.path.basename(info.path))
        files = _files_under(entry)
        marker = entry.read_json(MARKER) if MARKER in files else None
        out.append({"key": os.path.basename(info.path), "complete": marker is not None,
                    "bytes": sum(files.values()), "created": (marker or {}).get("created"),
                    "from_run": (marker or {}).get("from_run"), "uri": entry.uri})
    return out


def remove(storage: str, key: str) -> None:
    entry = cache_root(storage).stage(key)
    entry.fs.delete_dir(entry.path)


def report_section(run: RunDir, artifact: Any) -> list[str]:
    """The data stage's report section, with where the data came from when the cache served it."""
    from bigopt.data.prepare import report_section as prepared_section

    lines = prepared_section(run, artifact)
    if run.exists("cache.json"):
        info = run.read_json("cache.json")
        said = (f"- **cache hit** `{info['key'][:12]}`: preparation skipped, shards read from "
                f"`{info['entry']}` (prepared in {info.get('prepared_in')})" if info["hit"] else
                f"- cache miss `{info['key'][:12]}`: prepared here and published to `{info['entry']}`")
        lines.insert(2, said)
    return lines


def older_than(storage: str, days: float) -> list[str]:
    """Keys of entries created more than ``days`` ago (incomplete ones count as oldest)."""
    cutoff = _dt.datetime.now(_dt.timezone.utc) - _dt.timedelta(days=days)
    return [e["key"] for e in entries(storage)
            if e["created"] is None or _dt.datetime.fromisoformat(e["created"]) < cutoff]

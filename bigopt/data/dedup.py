"""Exact and near-duplicate rows as cleaning steps (``exact_dedup``, ``near_dedup``).

Both are ``fn(ds, step, ctx) -> StepOutput`` (see :mod:`bigopt.data.steps`): every input row
is either kept or rejected with a reason, and the per-row work runs in Ray Data tasks.

**exact_dedup**: a sha256 of each row's content (the UTF-8 bytes of a text; an image array's
dtype, shape and bytes) is computed in ``map_batches``; the rows are hash-partitioned by it
(one shuffle) and each partition's task keeps each hash's smallest key and rejects the others
with ``exact_duplicate: same content as <kept key>``; the driver sees counts and the report's
few largest groups.

**near_dedup** (text only), MinHash + LSH in the usual shape of distributed dedup pipelines:

1. *Signatures* (``map_batches``): shingles are ``shingle`` consecutive **bytes** of the UTF-8
   text (character shingles, which see a renamed variable or an edited line as a small change;
   a text shorter than ``shingle`` is one shingle, padded with NUL). Each shingle is hashed to
   32 bits (FNV-1a over its bytes, then the splitmix64 finaliser), and ``num_perm`` universal
   hash functions ``h_i(x) = ((a_i x + b_i) mod 2^64) >> 32`` (multiply-shift, ``a_i`` odd,
   drawn from a fixed seed so results never depend on the split seed) give the signature:
   ``sig[i] = min over shingles of h_i``. Vectorised in numpy over a whole batch (a segmented
   minimum over each document's distinct shingles, concatenated), no Python loop per shingle
   or per document.
   ``P(sig_A[i] == sig_B[i]) = J(A, B)``, so the share of equal entries estimates Jaccard.
2. *LSH banding*: the signature is cut into ``b`` bands of ``r`` rows (``b * r <= num_perm``)
   with ``(b, r)`` minimising the (equally weighted) integrated false-positive and
   false-negative probabilities of the S-curve ``1 - (1 - s^r)^b`` around ``threshold`` (the
   rule of datasketch's ``MinHashLSH._optimal_param``; 0.8 and 128 give 9 bands of 13 rows).
   Each document emits one ``(band, bucket, key)`` row per band, ``bucket`` a 64-bit hash of
   the band's ``r`` values.
3. *Candidates*: the band rows are hash-partitioned by ``(band, bucket)`` in plain Ray tasks
   (one per ~256 MiB of signatures, its partitions returned as task outputs, Ray's "shuffle with
   tasks" pattern, ``bigopt.data.pair_join``), so every row of a bucket lands in one task, and
   each partition's task sorts its rows and lists the buckets holding two keys or more: no bucket
   id or key comes to the driver or rides in a closure, and no Python call is made per bucket
   (almost all hold one key). (Ray Data's groupby did this with two hash shuffles: 5.2 s against
   12.5 at 1M rows, and its shuffles left memory in the driver.) They give candidate pairs: all
   pairs of a bucket of up to ``MAX_BUCKET_PAIRS_MEMBERS`` keys; a larger bucket (hundreds of
   near-identical files) gives each key paired with the bucket's smallest key and with its
   neighbour in key order (2 m pairs instead of m^2/2; a key that verifies against neither may
   miss its cluster there). The pairs are split again by their first key, and each partition keeps
   each pair once (a pair shares buckets in several bands).
4. *Verification*: a pair is kept when its estimated Jaccard (share of equal signature
   entries) is ``>= threshold``, which drops LSH false positives. The candidate pairs are
   usually a small share of the rows (a tenth of them at 10 % near-copies), so the engine
   rule (``bigopt.data.engine.fits_one_task``) decides again here: the signatures of the keys
   in some pair are fetched by a filter that receives the pairs' key set by reference (a
   broadcast semi-join), and where pairs and signatures fit one task, steps 4 and 5 run there
   with the single path's own ``_clusters`` (numpy, union-find). Over the rule (10M rows:
   ~1 GB), each pair's two signatures are brought together by a hash join written as plain
   Ray tasks (``bigopt.data.pair_join``: partitions as task outputs, no Ray Data shuffle).
5. *Clusters*: connected components of the verified pairs, every node labelled with its
   component's smallest key, the kept one. Over the rule for pairs and signatures, the verified
   pairs (two keys and a similarity each) are clustered in one task where they fit (scipy's
   connected components, ``bigopt.data.components.label_components``), else by min-label
   propagation on Ray Data (``bigopt.data.components.components``). Transitive chains (A~B,
   B~C) become one cluster even when A and C are less similar than ``threshold``. ``action:
   drop`` rejects the others with ``near_duplicate: ~J=0.87 with <kept key>`` (the estimated
   Jaccard with the kept row); ``action: group`` rejects nothing and adds a ``group`` column
   (the cluster's kept key, or a row's own key) so the split keeps a cluster on one side. Each
   row's decision is a lookup of its key in the members' table, sent to the row tasks by
   reference where it fits one task (a broadcast join), else a cogroup of the rows with it: no
   key set comes to the driver or rides in a closure; the driver sees counts and the report's
   five largest clusters.

The single-task path (``near_duplicates_single``, for inputs the engine rule calls small)
makes the same decisions in one process: the same signatures and band hashes, buckets by a
numpy sort, union-find with the smallest key as root.

Everything is deterministic: fixed hash seeds, and every choice (kept key, examples) is by
sorted key, independent of how Ray Data ordered or split the blocks.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from collections.abc import Iterable
from typing import Any

import numpy as np

from bigopt.data.steps import (
    REASON,
    Marked,
    StepContext,
    StepOutput,
    pickled_bytes,
    split_by_reason,
    split_marked_dataset,
)

log = logging.getLogger("bigopt")

#: Seed of the MinHash permutations and band hashes (not the split seed: the same corpus gives
#: the same clusters whatever the split).
MINHASH_SEED = 1
#: A colliding bucket with more keys than this gives 2 m candidate pairs instead of m(m-1)/2.
MAX_BUCKET_PAIRS_MEMBERS = 64
#: Rows per hash partition of a groupby: Ray Data's default of 200 partitions costs ~15 s of
#: task overhead on 2 cores for a few thousand rows; larger inputs get more partitions.
ROWS_PER_PARTITION = 200_000
#: Example clusters reported in ``details``.
EXAMPLES = 5

_M64 = 0xFFFFFFFFFFFFFFFF
_FNV_OFFSET = np.uint64(0xCBF29CE484222325)
_FNV_PRIME = np.uint64(0x100000001B3)


def _py(value: Any) -> Any:
    """A numpy scalar as a plain Python value (dict keys, JSON)."""
    return value.item() if isinstance(value, np.generic) else value


# --------------------------------------------------------------------------- exact duplicates


def _partitions(rows: int) -> int:
    return max(2, min(200, rows // ROWS_PER_PARTITION + 1))


def content_hash(value: Any) -> str:
    """sha256 of a row's content: text bytes (str as UTF-8), or an array's dtype+shape+bytes."""
    if isinstance(value, bytes | bytearray | np.bytes_):
        return hashlib.sha256(bytes(value)).hexdigest()
    if isinstance(value, str):
        return hashlib.sha256(value.encode("utf-8")).hexdigest()
    arr = np.ascontiguousarray(np.asarray(value))
    head = f"{arr.dtype.str}{arr.shape}".encode()
    return hashlib.sha256(head + b"\0" + arr.tobytes()).hexdigest()


def _add_hash(batch: dict[str, np.ndarray], content: str) -> dict[str, np.ndarray]:
    batch["_hash"] = np.array([content_hash(v) for v in batch[content]], dtype=object)
    return batch


def _exact_reason(key: Any, kept: Any) -> str:
    return "" if kept is None or _py(key) == kept else f"exact_duplicate: same content as {kept}"


def _exact_details(sizes: list[tuple[int, Any]], members: dict[Any, list[Any]]) -> dict[str, Any]:
    """``sizes``: (rows, kept key) of every duplicated content; ``members``: the smallest
    rejected keys of the largest groups (``_top_groups``), for the report."""
    sizes = sorted(sizes, key=lambda s: (-s[0], str(s[1])))
    examples = [{"kept": k, "rows": n, "rejected": members.get(k, [])} for n, k in sizes[:EXAMPLES]]
    return {"duplicate_groups": len(sizes), "rows_removed": sum(n - 1 for n, _ in sizes),
            "examples": examples}


def _largest(sizes: list[tuple[int, Any]]) -> list[tuple[int, Any]]:
    """The ``EXAMPLES`` largest (size, key), ties by key: the report's one rule, both paths."""
    return sorted(sizes, key=lambda s: (-s[0], str(s[1])))[:EXAMPLES]


def _top_groups(sizes: list[tuple[int, Any]]) -> set[Any]:
    return {k for _, k in _largest(sizes)}


def _add_member(members: dict[Any, list[Any]], kept: Any, key: Any) -> None:
    """Keep the EXAMPLES smallest rejected keys of a group (by str): bounded, and the same
    whatever order the rows arrive in."""
    got = members[kept]
    got.append(key)
    got.sort(key=str)
    del got[EXAMPLES:]


def _mark_duplicates(part: dict[str, np.ndarray], key: str) -> dict[str, np.ndarray]:
    """Ray Data task over one hash partition (every row of a content hash is in the same one):
    in each hash's rows the smallest key is kept, the others get the reject reason; ``_kept``
    names the group's kept key and ``_rows`` its size on the kept row of a duplicated group (0
    elsewhere), for the report's largest groups. A numpy sort finds the groups: no Python call
    per group for the ~all unique rows."""
    keys = np.array([_py(k) for k in part[key]], dtype=object)
    hashes = np.asarray(part["_hash"], dtype=object).astype(str)
    n = len(keys)
    reasons = np.full(n, "", dtype=object)
    kept_col = np.full(n, "", dtype=object)
    rows_col = np.zeros(n, dtype=np.int64)
    order = np.argsort(hashes, kind="stable")
    ordered = hashes[order]
    starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]]) if n else np.empty(0, int)
    sizes = np.diff(np.r_[starts, n])
    for start, size in zip(starts[sizes >= 2], sizes[sizes >= 2], strict=True):
        members = order[start:start + size]
        group = keys[members].tolist()
        kept = min(group)
        for i, k in zip(members.tolist(), group, strict=True):
            reasons[i] = _exact_reason(k, kept)
            kept_col[i] = str(kept)
            rows_col[i] = size if k == kept else 0
    part[REASON], part["_kept"], part["_rows"] = reasons, kept_col, rows_col
    return part


def _with_hash_partition(batch: dict[str, np.ndarray], parts: int) -> dict[str, np.ndarray]:
    batch["_part"] = np.array([int(h[:15], 16) % parts for h in batch["_hash"]], dtype=np.int32)
    return batch


def _top_heads(batch: dict[str, np.ndarray], key: str, size: str) -> dict[str, np.ndarray]:
    """Ray Data task: this batch's ``EXAMPLES`` largest groups (by ``size``, ties by key) and
    its number of groups and of rows in them, so the driver merges a few rows per batch."""
    order = sorted(range(len(batch[key])), key=lambda i: (-int(batch[size][i]), str(batch[key][i])))
    top = order[:EXAMPLES]
    count = np.zeros(len(top), dtype=np.int64)
    total = np.zeros(len(top), dtype=np.int64)
    if top:
        count[0], total[0] = len(batch[key]), int(np.asarray(batch[size], dtype=np.int64).sum())
    return {key: np.asarray(batch[key], dtype=object)[top],
            size: np.asarray(batch[size], dtype=np.int64)[top], "_count": count, "_total": total}


def top_groups(ds: Any, key: str, size: str) -> tuple[list[tuple[int, Any]], int, int]:
    """(the ``EXAMPLES`` largest (size, key) by size then key, number of rows of ``ds``, sum of
    ``size``): per-batch tops and counts computed in Ray Data tasks, merged in the driver (a
    handful of rows per batch, never one per group)."""
    top: list[tuple[int, Any]] = []
    count = total = 0
    for batch in ds.map_batches(_top_heads, fn_kwargs={"key": key, "size": size},
                                batch_size=65536).iter_batches(batch_format="numpy",
                                                               batch_size=65536):
        count += int(batch["_count"].sum())
        total += int(batch["_total"].sum())
        top = _largest([*top, *((int(n), _py(k)) for k, n in zip(batch[key], batch[size],
                                                                  strict=True))])
    return top, count, total


def exact_duplicates(ds: Any, step: Any, ctx: StepContext) -> StepOutput:
    """Rows whose content hash equals another's: the smallest key is kept, the others rejected.

    One Ray Data shuffle by hash partition (``groupby(_part).map_groups``) decides every row
    inside its partition's task: no hash -> kept-key table comes to the driver or rides in a
    task's closure. The group count, removed rows and the report's largest groups come from
    per-batch partials (``top_groups``), and the largest groups' rejected keys by a filter on
    those few keys."""
    from ray.data.expressions import col

    hashed = ds.map_batches(_add_hash, fn_kwargs={"content": ctx.content}, batch_size=64).materialize()
    parts = _partitions(hashed.count())
    marked = (hashed.map_batches(_with_hash_partition, fn_kwargs={"parts": parts}, batch_size=4096)
              .groupby("_part", num_partitions=parts)
              .map_groups(_mark_duplicates, fn_kwargs={"key": ctx.key}, batch_format="numpy")
              .drop_columns(["_part"]).materialize())
    extra = ["_hash", "_kept", "_rows"]
    out = split_marked_dataset(marked, "exact_dedup")
    heads = marked.filter(expr=col("_rows") >= 2).select_columns([ctx.key, "_rows"])
    sizes, groups, rows_in_groups = top_groups(heads, ctx.key, "_rows")
    removed = rows_in_groups - groups
    wanted = {str(k) for _, k in sizes}
    members: dict[Any, list[Any]] = {k: [] for _, k in sizes}
    by_str = {str(k): k for _, k in sizes}
    if wanted:  # the rejected keys of the largest groups, for the report
        for row in (out.rejected.select_columns([ctx.key, "_kept"])
                    .filter(lambda r: r["_kept"] in wanted).iter_rows()):
            _add_member(members, by_str[row["_kept"]], _py(row[ctx.key]))
    details = _exact_details(sizes, members)
    details.update(duplicate_groups=groups, rows_removed=removed)
    return StepOutput(out.kept.drop_columns(extra), out.rejected.drop_columns(extra), details,
                      task_arg_bytes=max(out.task_arg_bytes, pickled_bytes(wanted)))


def exact_duplicates_single(batch: dict[str, np.ndarray], step: Any, ctx: StepContext) -> Marked:
    """``exact_dedup`` over one in-memory batch: the same hashes, kept keys and reasons as
    :func:`exact_duplicates`, grouped with a dict instead of a Ray Data groupby."""
    keys = [_py(k) for k in batch[ctx.key]]
    hashes = [content_hash(v) for v in batch[ctx.content]]
    groups: dict[str, list[Any]] = {}
    for key, h in zip(keys, hashes, strict=True):
        groups.setdefault(h, []).append(key)
    kept_of = {h: min(members) for h, members in groups.items() if len(members) >= 2}
    sizes = [(len(groups[h]), kept) for h, kept in kept_of.items()]
    reasons = [_exact_reason(key, kept_of.get(h)) for key, h in zip(keys, hashes, strict=True)]
    wanted = _top_groups(sizes)
    members: dict[Any, list[Any]] = {k: [] for k in wanted}
    for h, kept in kept_of.items():
        if kept in wanted:
            for key in groups[h]:
                if key != kept:
                    _add_member(members, kept, key)
    return Marked(reasons, _exact_details(sizes, members))


# --------------------------------------------------------------------------- MinHash + LSH


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser on a uint64 array (wrapping arithmetic)."""
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def permutations(num_perm: int, seed: int = MINHASH_SEED) -> tuple[np.ndarray, np.ndarray]:
    """``num_perm`` multiply-shift hash functions: odd multipliers ``a`` and offsets ``b``."""
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 2**63, size=num_perm, dtype=np.uint64) * np.uint64(2) + np.uint64(1)
    b = rng.integers(0, 2**63, size=num_perm, dtype=np.uint64)
    return a, b


def _as_bytes(value: Any) -> bytes:
    if isinstance(value, bytes | bytearray | np.bytes_):
        return bytes(value)
    return str(value).encode("utf-8")


def minhash_signatures(texts: Iterable[Any], shingle: int, num_perm: int,
                       seed: int = MINHASH_SEED) -> np.ndarray:
    """MinHash signatures, ``uint32[len(texts), num_perm]``, of the byte-shingle sets of texts."""
    k = shingle
    docs = [_as_bytes(t) for t in texts]
    docs = [d if len(d) >= k else d + b"\0" * (k - len(d)) for d in docs]  # >= 1 shingle each
    sig = np.empty((len(docs), num_perm), dtype=np.uint32)
    if not docs:
        return sig
    a, b = permutations(num_perm, seed)
    # about 0.5M shingles at a time: a few MB per array, which the allocator reuses from one
    # chunk to the next (4M-shingle chunks took fresh pages each time: 1.7x slower)
    start = 0
    while start < len(docs):
        stop, total = start, 0
        while stop < len(docs) and (stop == start or total + len(docs[stop]) <= 500_000):
            total += len(docs[stop])
            stop += 1
        sig[start:stop] = _signatures(docs[start:stop], k, a, b)
        start = stop
    return sig


def _signatures(docs: list[bytes], k: int, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    lengths = np.array([len(d) for d in docs], dtype=np.int64)
    buf = np.frombuffer(b"".join(docs), dtype=np.uint8).astype(np.uint64)
    n_win = len(buf) - k + 1
    h = np.full(n_win, _FNV_OFFSET, dtype=np.uint64)
    for j in range(k):  # FNV-1a over the k bytes of every window at once
        h = (h ^ buf[j:j + n_win]) * _FNV_PRIME
    x = _mix64(h) >> np.uint64(32)  # 32-bit shingle hashes
    ends = np.cumsum(lengths)
    doc_of = np.repeat(np.arange(len(docs)), lengths)[:n_win]
    # windows inside one document: all but the last k-1 starts of each (they cross into the
    # next); marked by index, not by comparing every window with its document's end
    inside = np.ones(n_win, dtype=bool)
    crossing = (ends[:, None] - np.arange(1, k, dtype=np.int64)[None, :]).ravel()
    inside[crossing[(crossing >= 0) & (crossing < n_win)]] = False
    # each document's distinct shingles only (sorted by document): in source code ~75 % of
    # 5-byte shingles repeat within a file (indentation, keywords), so this is ~4x less work
    both = np.unique((doc_of[inside].astype(np.uint64) << np.uint64(32)) | x[inside])
    x = both & np.uint64(0xFFFFFFFF)
    seg = np.searchsorted(both >> np.uint64(32), np.arange(len(docs), dtype=np.uint64))
    out = np.empty((len(docs), len(a)), dtype=np.uint32)
    # one permutation at a time over a contiguous vector: ~5x faster than a [shingles, block]
    # matrix (whose reduceat strides across rows), the same values
    for p in range(len(a)):
        out[:, p] = np.minimum.reduceat((x * a[p] + b[p]) >> np.uint64(32), seg)
    return out


#: Text bytes per signature task on the single-task path: below this, the step's own task does
#: them all (a task costs ~0.5 s to start in a fresh worker, what 4 MB of MinHash takes).
SIGNATURE_TASK_BYTES = 4 * 2**20


def spread_signatures(texts: Any, shingle: int, num_perm: int) -> np.ndarray:
    """:func:`minhash_signatures` of ``texts`` in order, in up to one Ray task per CPU (by
    contiguous pieces of about equal bytes) when Ray is up and there is enough text: the
    single-task path's one parallel part, the same values as one call."""
    import ray

    lengths = np.array([len(t) for t in texts], dtype=np.int64)
    pieces = 1
    if ray.is_initialized():
        cpus = int(ray.cluster_resources().get("CPU", 1))
        pieces = max(1, min(cpus, int(lengths.sum()) // SIGNATURE_TASK_BYTES, len(texts)))
    if pieces == 1:
        return minhash_signatures(texts, shingle, num_perm)
    from bigopt.data.engine import submit

    ends = np.cumsum(lengths)
    cuts = [0, *np.searchsorted(ends, ends[-1] * np.arange(1, pieces) / pieces).tolist(), len(texts)]
    refs = [submit(minhash_signatures, list(texts[a:b]), shingle, num_perm)
            for a, b in zip(cuts[:-1], cuts[1:], strict=True) if b > a]
    return np.concatenate(ray.get(refs))


def _area(ys: np.ndarray, xs: np.ndarray) -> float:
    return float(np.sum((ys[1:] + ys[:-1]) * np.diff(xs)) / 2)  # trapezoids


def lsh_params(threshold: float, num_perm: int, fp_weight: float = 0.5,
               fn_weight: float = 0.5) -> tuple[int, int]:
    """``(bands, rows)`` minimising the weighted false-positive + false-negative areas under
    the S-curve ``P(candidate | s) = 1 - (1 - s^rows)^bands`` (datasketch's ``_optimal_param``)."""
    below, above = np.linspace(0.0, threshold, 257), np.linspace(threshold, 1.0, 257)
    best, best_err = (1, num_perm), float("inf")
    for bands in range(1, num_perm + 1):
        for rows in range(1, num_perm // bands + 1):
            fp = _area(1 - (1 - below ** rows) ** bands, below)
            fn = _area((1 - above ** rows) ** bands, above)
            err = fp * fp_weight + fn * fn_weight
            if err < best_err:
                best, best_err = (bands, rows), err
    return best


def band_hashes(sig: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """``int64[n, bands]``: a 64-bit hash of each band's ``rows`` signature values."""
    out = np.empty((sig.shape[0], bands), dtype=np.uint64)
    for i in range(bands):
        h = np.full(sig.shape[0], np.uint64(MINHASH_SEED + i), dtype=np.uint64)
        for j in range(i * rows, (i + 1) * rows):
            h = _mix64(h ^ sig[:, j].astype(np.uint64))
        out[:, i] = h
    return out.view(np.int64)


def _signature_batch(batch: dict[str, np.ndarray], key: str, content: str, shingle: int,
                     num_perm: int) -> dict[str, np.ndarray]:
    return {key: batch[key], "sig": minhash_signatures(batch[content], shingle, num_perm)}


def _with_partition(batch: dict[str, np.ndarray], parts: int) -> dict[str, np.ndarray]:
    """Tag each band row with its hash partition (by band and bucket): every row of one bucket
    lands in the same partition."""
    bucket = np.asarray(batch["bucket"], dtype=np.int64).view(np.uint64)
    band = np.asarray(batch["band"], dtype=np.uint64)
    batch["part"] = ((bucket ^ (band * np.uint64(0x9E3779B97F4A7C15))) % np.uint64(parts)).astype(np.int32)
    return batch


def _partition_pairs(part: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Ray Data task: the candidate pairs of one hash partition's band rows (its buckets whole),
    by a numpy sort on (band, bucket): no per-bucket Python call for the ~all singletons."""
    band = np.asarray(part["band"], dtype=np.int64)
    bucket = np.asarray(part["bucket"], dtype=np.int64)
    keys = np.asarray(part["key"], dtype=object)
    order = np.lexsort((bucket, band))
    band, bucket = band[order], bucket[order]
    same = np.r_[False, (band[1:] == band[:-1]) & (bucket[1:] == bucket[:-1])]
    starts = np.flatnonzero(~same)
    sizes = np.diff(np.r_[starts, len(order)])
    pairs = [p for start, size in zip(starts[sizes >= 2], sizes[sizes >= 2], strict=True)
             for p in bucket_pairs(keys[order[start:start + size]])]
    return {"a": np.array([a for a, _ in pairs], dtype=object),
            "b": np.array([b for _, b in pairs], dtype=object)}


def bucket_pairs(keys: Iterable[Any]) -> list[tuple[str, str]]:
    """Candidate pairs of one LSH bucket's keys (see step 3 of the module docstring)."""
    members = sorted({str(k) for k in keys})
    if len(members) <= MAX_BUCKET_PAIRS_MEMBERS:
        return [(x, y) for i, x in enumerate(members) for y in members[i + 1:]]
    pairs = [(members[0], y) for y in members[1:]]
    return pairs + [(x, y) for x, y in zip(members[1:], members[2:], strict=False)]


def local_candidates(keys: np.ndarray, sig: np.ndarray, bands: int, rows: int) -> set[tuple[str, str]]:
    """Candidate pairs of rows held in one process: the rows sharing a band's bucket, found by
    sorting each band's hashes (the same buckets as the distributed groupby, so the same pairs)."""
    hashes = band_hashes(sig, bands, rows)
    keys = np.asarray(keys, dtype=object)
    candidates: set[tuple[str, str]] = set()
    for band in range(bands):
        order = np.argsort(hashes[:, band], kind="stable")
        ordered = hashes[order, band]
        starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])
        sizes = np.diff(np.r_[starts, len(ordered)])
        for start, size in zip(starts[sizes >= 2], sizes[sizes >= 2], strict=True):
            candidates.update(bucket_pairs(keys[order[start:start + size]]))
    return candidates


class _UnionFind:
    def __init__(self) -> None:
        self.parent: dict[str, str] = {}

    def find(self, x: str) -> str:
        root = x
        while self.parent.get(root, root) != root:
            root = self.parent[root]
        while x != root:  # path compression
            self.parent[x], x = root, self.parent[x]
        return root

    def union(self, x: str, y: str) -> None:
        rx, ry = self.find(x), self.find(y)
        if rx != ry:  # the smaller key is the root: a cluster's root is its kept key
            self.parent[max(rx, ry)] = min(rx, ry)
            self.parent.setdefault(min(rx, ry), min(rx, ry))


def _near_params(step: Any, ctx: StepContext) -> tuple[float, int, int, str, int, int]:
    if ctx.modality != "text":
        raise ValueError(f"data.steps[].kind: near_dedup needs text rows, not {ctx.modality} "
                         "(use exact_dedup for images)")
    threshold, shingle, num_perm = float(step.threshold), int(step.shingle), int(step.num_perm)
    bands, rows = lsh_params(threshold, num_perm)
    return threshold, shingle, num_perm, getattr(step, "action", "drop"), bands, rows


def _clusters(candidates: set[tuple[str, str]], matrix: np.ndarray, index: dict[str, int],
              threshold: float) -> tuple[dict[str, list[str]], dict[str, tuple[str, float]], int]:
    """Verified pairs -> clusters (root -> members) and each non-root member's (root, ~J)."""

    def similarity(x: list[str], y: list[str]) -> np.ndarray:
        if not x:
            return np.empty(0)
        return (matrix[[index[k] for k in x]] == matrix[[index[k] for k in y]]).mean(axis=1)

    pair_list = sorted(candidates)
    sims = similarity([p[0] for p in pair_list], [p[1] for p in pair_list])
    uf = _UnionFind()
    verified = 0
    for (x, y), s in zip(pair_list, sims, strict=True):
        if s >= threshold:
            uf.union(x, y)
            verified += 1
    clusters: dict[str, list[str]] = {}
    for k in sorted(uf.parent):
        clusters.setdefault(uf.find(k), []).append(k)
    clusters = {root: m for root, m in clusters.items() if len(m) >= 2}
    kept_of: dict[str, tuple[str, float]] = {}
    for root, members in clusters.items():
        others = [m for m in members if m != root]
        for m, s in zip(others, similarity(others, [root] * len(others)), strict=True):
            kept_of[m] = (root, float(s))
    return clusters, kept_of, verified


def _near_reasons(keys: Iterable[Any], kept_of: dict[str, tuple[str, float]]) -> list[str]:
    out = []
    for k in keys:
        hit = kept_of.get(str(k))
        out.append("" if hit is None else f"near_duplicate: ~J={hit[1]:.2f} with {hit[0]}")
    return out


def _groups(keys: Iterable[Any], clusters: dict[str, list[str]]) -> np.ndarray:
    """action: group: each row's cluster (its kept key), or the row's own key."""
    groups = {m: root for root, members in clusters.items() for m in members}
    return np.array([groups.get(str(k), str(k)) for k in keys], dtype=object)


def _near_details(clusters: dict[str, list[str]], kept_of: dict[str, tuple[str, float]],
                  action: str, params: dict[str, Any]) -> dict[str, Any]:
    ranked = sorted(clusters.items(), key=lambda c: (-len(c[1]), c[0]))
    examples = [{"kept": root, "rows": len(members),
                 "similar": [{"key": m, "jaccard": round(kept_of[m][1], 3)}
                             for m in members if m != root][:EXAMPLES]}
                for root, members in ranked[:EXAMPLES]]
    return {"clusters": len(clusters), "rows_in_clusters": sum(len(m) for m in clusters.values()),
            "rows_removed": 0 if action == "group" else len(kept_of), "action": action,
            **params, "examples": examples}


def _phases(ticks: list[float]) -> dict[str, float]:
    """Seconds of near_dedup's three phases (the scaling benchmark reads them per row)."""
    names = ("signatures", "candidates", "clusters")
    return {n: round(b - a, 3) for n, a, b in zip(names, ticks, ticks[1:], strict=False)}


def near_duplicates_single(batch: dict[str, np.ndarray], step: Any, ctx: StepContext) -> Marked:
    """``near_dedup`` over one in-memory batch: the same signatures, buckets, pairs, clusters
    and reasons as :func:`near_duplicates`, with numpy sorts instead of Ray Data groupbys."""
    threshold, shingle, num_perm, action, bands, rows = _near_params(step, ctx)
    clock = time.perf_counter()
    keys = np.array([str(k) for k in batch[ctx.key]], dtype=object)
    sig = spread_signatures(batch[ctx.content], shingle, num_perm)
    ticks = [clock, time.perf_counter()]
    candidates = local_candidates(keys, sig, bands, rows)
    ticks.append(time.perf_counter())
    clusters, kept_of, verified = _clusters(candidates, sig, {k: i for i, k in enumerate(keys)},
                                            threshold)
    ticks.append(time.perf_counter())
    log.info("near_dedup (single task): %d rows in %.1f s, %d candidate pairs, %d verified",
             len(keys), time.perf_counter() - clock, len(candidates), verified)
    params = {"bands": bands, "rows_per_band": rows, "threshold": threshold, "shingle": shingle,
              "num_perm": num_perm, "candidate_pairs": len(candidates), "verified_pairs": verified,
              "phase_seconds": _phases(ticks)}
    details = _near_details(clusters, kept_of, action, params)
    if action == "group":
        return Marked([""] * len(keys), details, {"group": _groups(keys, clusters)})
    return Marked(_near_reasons(keys, kept_of), details)


def near_duplicates(ds: Any, step: Any, ctx: StepContext) -> StepOutput:
    """Near-duplicate text rows by MinHash + LSH (see the module docstring)."""
    threshold, shingle, num_perm, action, bands, rows = _near_params(step, ctx)
    clock = [time.perf_counter()]
    sigs = ds.select_columns([ctx.key, ctx.content]).map_batches(
        _signature_batch, batch_size=256,
        fn_kwargs={"key": ctx.key, "content": ctx.content, "shingle": shingle, "num_perm": num_perm},
    ).materialize()
    clock.append(time.perf_counter())
    parts = _partitions(sigs.count() * bands)
    pairs, n_candidates = _candidate_pairs(sigs, ctx.key, bands, rows, num_perm)
    clock.append(time.perf_counter())
    found = (_near_clusters(ds, sigs, pairs, ctx, threshold, action, parts, num_perm)
             if n_candidates else None)
    clock.append(time.perf_counter())
    verified = found["verified"] if found else 0
    log.info("near_dedup: signatures %.1f s, LSH buckets and candidate pairs %.1f s, verification "
             "and clusters %.1f s (%d bands x %d rows, %d candidate pairs, %d verified)",
             clock[1] - clock[0], clock[2] - clock[1], clock[3] - clock[2], bands, rows,
             n_candidates, verified)
    params = {"bands": bands, "rows_per_band": rows, "threshold": threshold, "shingle": shingle,
              "num_perm": num_perm, "candidate_pairs": n_candidates, "verified_pairs": verified,
              "phase_seconds": _phases(clock)}
    if found is None:
        out = split_by_reason(ds, "near_dedup", lambda batch: [""] * len(batch[ctx.key]))
        if action == "group":
            out.kept = out.kept.map_batches(
                lambda b: {**b, "group": np.array([str(k) for k in b[ctx.key]], dtype=object)},
                batch_size=256)
        details = _near_details({}, {}, action, params)
    else:
        out = split_marked_dataset(found["marked"], "near_dedup")
        details = {"clusters": found["clusters"], "rows_in_clusters": found["rows_in_clusters"],
                   "rows_removed": 0 if action == "group" else found["removed"], "action": action,
                   **params, "examples": found["examples"]}
    return StepOutput(out.kept, out.rejected, details, task_arg_bytes=out.task_arg_bytes)


#: Bytes of one band row (band, bucket, key) in memory, to size the candidates' partitions.
BAND_ROW_BYTES = 32


def _band_partitions(key: str, bands: int, rows: int, width: int, parts: int, *blocks: Any) -> Any:
    """Ray task: signature blocks' band rows ``{band, bucket, key}`` in ``parts`` hash
    partitions of (band, bucket), so every row of a bucket lands in one partition."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from bigopt.data.engine import concat
    from bigopt.data.pair_join import signature_matrix, split_rows
    from bigopt.data.range_sort import _arrow

    table = concat([_arrow(b) for b in blocks])
    n = table.num_rows
    hashes = band_hashes(signature_matrix(table.column("sig"), width), bands, rows)
    band_rows = {"band": np.tile(np.arange(bands, dtype=np.int32), n), "bucket": hashes.reshape(-1)}
    where = _with_partition(dict(band_rows), parts)["part"]
    keys = pc.cast(table.column(key), pa.string()).take(pa.array(np.repeat(np.arange(n), bands)))
    return split_rows(pa.table({**band_rows, "key": keys}), where, parts)


def _bucket_pair_partitions(parts: int, *pieces: Any) -> Any:
    """Ray task: one (band, bucket) partition's candidate pairs ``{a, b}`` (``_partition_pairs``),
    in ``parts`` hash partitions of ``a`` (a pair found in several bands meets itself there)."""
    import pyarrow as pa

    from bigopt.data.components import hash_partition
    from bigopt.data.engine import concat
    from bigopt.data.pair_join import split_rows

    table = concat(pieces)
    found = _partition_pairs({c: table.column(c).to_numpy(zero_copy_only=False)
                              for c in ("band", "bucket", "key")})
    out = pa.table({"a": pa.array(found["a"], pa.string()), "b": pa.array(found["b"], pa.string())})
    return split_rows(out, hash_partition(out.column("a"), parts), parts)


def _unique_pairs(*pieces: Any) -> tuple[Any, int]:
    """Ray task: one partition's pairs, each once; returns (table, rows)."""
    from bigopt.data.engine import concat

    table = concat(pieces).group_by(["a", "b"]).aggregate([])
    return table, table.num_rows


def _candidate_pairs(sigs: Any, key: str, bands: int, rows: int, num_perm: int) -> tuple[Any, int]:
    """LSH candidate pairs of the signatures (a materialized Dataset) as a Dataset of ``{a, b}``
    (None where there are no rows) and their count, by hash partitions in plain Ray tasks
    (``bigopt.data.pair_join``): band rows split by (band, bucket), each partition's buckets
    listed by a numpy sort, the pairs split by their first key and kept once. Ray Data's groupby
    did the same with two hash shuffles (337-348 s at 10M rows, and ~7 MB of the driver's growth
    there, BENCHMARKS 7c)."""
    import ray

    from bigopt.data import pair_join
    from bigopt.data.engine import submit_bounded
    from bigopt.data.range_sort import block_refs, group_blocks

    blocks = block_refs(sigs)
    if not blocks:  # no rows: no pairs
        return None, 0
    band_bytes = sum(n for _, n, _ in blocks) * bands * BAND_ROW_BYTES
    band_parts = max(1, math.ceil(band_bytes / pair_join.PART_BYTES))
    pair_parts = max(1, math.ceil(band_parts / 4))
    split = submit_bounded([(_band_partitions, key, bands, rows, num_perm, band_parts, *g)
                            for g in group_blocks(blocks, pair_join.GROUP_BYTES)], band_parts)
    found = submit_bounded([(_bucket_pair_partitions, pair_parts, *(s[p] for s in split))
                            for p in range(band_parts)], pair_parts)
    unique = submit_bounded([(_unique_pairs, *(f[q] for f in found)) for q in range(pair_parts)], 2)
    n_pairs = int(sum(ray.get([n for _, n in unique])))
    return ray.data.from_arrow_refs([t for t, _ in unique]), n_pairs


def _near_clusters(ds: Any, sigs: Any, pairs: Any, ctx: StepContext, threshold: float,
                   action: str, parts: int, num_perm: int) -> dict[str, Any]:
    """Verification, clusters, kept keys and each row's decision, all in Ray tasks: the driver
    sees counts and the report's few examples. Each part takes the engine rule
    (``fits_one_task``): the candidate pairs and their signatures are usually a small share of
    the rows (a tenth of them at 10 % near-copies), so where they fit one task they are
    verified and clustered there with the single path's own ``_clusters``, and the smaller side
    of each lookup goes to the tasks by reference (a broadcast join); above the rule, each pair
    meets its signatures in a hash join of Ray tasks (``bigopt.data.pair_join``) and the
    verified pairs are clustered in one task where they fit (``_clusters_partitioned``)."""
    from bigopt.data.engine import fits_one_task

    sigs = _signatures_in_pairs(sigs, pairs, ctx.key, parts)
    if fits_one_task(sigs.size_bytes() + pairs.size_bytes()):
        found = _clusters_in_task(sigs, pairs, ctx.key, threshold, action)
    else:
        found = _clusters_partitioned(sigs, pairs, ctx.key, threshold, parts, num_perm)
    labels, kept_of = found.pop("labels", None), found.pop("kept_of", None)
    if found["verified"] == 0:
        found["marked"] = ds.map_batches(_no_reason, fn_kwargs={"key": ctx.key,
                                                                "group": action == "group"},
                                         batch_size=256)
        return found
    found["marked"] = _mark_near(ds, labels, kept_of, ctx.key, action, parts).materialize()
    return found


def _pair_keys(*blocks: Any) -> Any:
    """Ray task: every key of some candidate pair, once (an Arrow string array)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from bigopt.data.engine import concat

    pairs = concat(blocks)
    return pc.unique(pa.concat_arrays([pairs["a"].combine_chunks(), pairs["b"].combine_chunks()]))


def _one_table(*blocks: Any) -> Any:
    """Ray task: blocks as one Arrow table (what a broadcast side is sent as)."""
    from bigopt.data.engine import concat

    return concat(blocks)


def _rows_with_keys(batch: Any, key: str, keys: Any) -> Any:
    """Ray Data task: the rows whose key is in ``keys`` (an ``ObjectRef``, fetched here)."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import ray

    return batch.filter(pc.is_in(pc.cast(batch[key], pa.string()), value_set=ray.get(keys)))


def _signatures_in_pairs(sigs: Any, pairs: Any, key: str, parts: int) -> Any:
    """The signatures of the keys in some candidate pair (materialized): the key set goes to
    a filter over the signatures by reference where it fits one task, else both are shuffled
    (a cogroup)."""
    import pyarrow as pa

    from bigopt.data.components import cogroup
    from bigopt.data.engine import fits_one_task, submit

    if fits_one_task(pairs.size_bytes()):
        keys = submit(_pair_keys, *pairs.to_arrow_refs())
        return sigs.map_batches(_rows_with_keys, fn_kwargs={"key": key, "keys": keys},
                                batch_format="pyarrow", batch_size=None).materialize()
    in_pairs = pairs.map_batches(lambda b: {"k": np.concatenate([b["a"], b["b"]])}, batch_size=65536)
    return cogroup(in_pairs, sigs, "k", key, lambda k, p, sg: [
        {key: k, "sig": np.asarray(sg[0]["sig"], dtype=np.uint32).tolist()}] if p and sg else [],
        {key: pa.string(), "sig": pa.list_(pa.uint32())}, parts).materialize()


def _cluster_task(key: str, threshold: float, action: str, n_sig_blocks: int,
                  *blocks: Any) -> tuple[dict[str, Any], Any, Any]:
    """Ray task: the candidate pairs verified, clustered and each member's kept key, by the
    single path's ``_clusters``; returns (summary, labels {node, label}, kept_of {m, r, sim})."""
    import pyarrow as pa

    from bigopt.data.engine import concat

    sigs, pairs = concat(blocks[:n_sig_blocks]), concat(blocks[n_sig_blocks:])
    keys = [str(k) for k in sigs[key].to_pylist()]
    candidates = set(zip(pairs["a"].to_pylist(), pairs["b"].to_pylist(), strict=True))
    clusters, kept_of, verified = _clusters(candidates, sigs["sig"].combine_chunks().to_numpy_ndarray(),
                                            {k: i for i, k in enumerate(keys)}, threshold)
    details = _near_details(clusters, kept_of, action, {})
    summary = {"verified": verified, "clusters": details["clusters"],
               "rows_in_clusters": details["rows_in_clusters"], "removed": len(kept_of),
               "examples": details["examples"]}
    labels = pa.table({"node": pa.array([m for ms in clusters.values() for m in ms], pa.string()),
                       "label": pa.array([r for r, ms in clusters.items() for _ in ms], pa.string())})
    kept = pa.table({"m": pa.array(list(kept_of), pa.string()),
                     "r": pa.array([r for r, _ in kept_of.values()], pa.string()),
                     "sim": pa.array([sim for _, sim in kept_of.values()], pa.float64())})
    return summary, labels, kept


def _clusters_in_task(sigs: Any, pairs: Any, key: str, threshold: float,
                      action: str) -> dict[str, Any]:
    import ray

    from bigopt.data.engine import submit

    sig_refs = sigs.to_arrow_refs()
    summary, labels, kept_of = submit(_cluster_task, key, threshold, action, len(sig_refs),
                                      *sig_refs, *pairs.to_arrow_refs(), returns=3)
    return {**ray.get(summary), "labels": labels, "kept_of": kept_of}


def _components_task(*edges: Any) -> tuple[Any, Any, dict[str, Any]]:
    """Ray task: verified pairs ``{a, b}`` -> labels ``{node, label}``, members ``{m, r}`` (each
    non-kept node and its kept key) and a summary (clusters, rows, bytes, the largest clusters)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from bigopt.data.components import label_components
    from bigopt.data.engine import concat

    labels, component, smallest = label_components(concat(edges), "a", "b")
    sizes = np.bincount(component)
    top = np.lexsort((smallest, -sizes))[:EXAMPLES]  # the largest clusters, ties by kept key
    nodes = labels.column("node")
    moved = pc.not_equal(nodes, labels.column("label"))
    members = pa.table({"m": nodes.filter(moved), "r": labels.column("label").filter(moved)})
    return labels, members, {
        "clusters": len(sizes), "rows_in_clusters": labels.num_rows, "labels_bytes": labels.nbytes,
        "members_bytes": members.nbytes,
        "top": [(str(nodes[int(smallest[c])]), int(sizes[c])) for c in top]}


def _examples_task(top: list[tuple[str, int]], *kept_of: Any) -> list[dict[str, Any]]:
    """Ray task: the report's largest clusters with their first members by key, from the
    members' similarities ``{m, r, sim}``."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from bigopt.data.engine import concat

    table = concat(kept_of)
    table = table.filter(pc.is_in(table.column("r"), value_set=pa.array([r for r, _ in top], pa.string())))
    similar: dict[str, list[tuple[str, float]]] = {r: [] for r, _ in top}
    for m, r, sim in zip(*(table.column(c).to_pylist() for c in ("m", "r", "sim")), strict=True):
        similar[r].append((m, sim))
    return [{"kept": root, "rows": n,
             "similar": [{"key": m, "jaccard": round(sim, 3)} for m, sim in sorted(similar[root])
                         ][:EXAMPLES]} for root, n in top]


def _one_side(refs: list[Any], nbytes: int) -> Any:
    """Tables in the object store as what ``_mark_near`` takes: one table's ref where they fit
    one task (sent by reference), else a Dataset (cogrouped with the rows)."""
    import ray

    from bigopt.data.engine import fits_one_task, submit

    return submit(_one_table, *refs) if fits_one_task(nbytes) else ray.data.from_arrow_refs(refs)


def _clusters_partitioned(sigs: Any, pairs: Any, key: str, threshold: float, parts: int,
                          num_perm: int) -> dict[str, Any]:
    """The same as ``_cluster_task`` for pair tables over the rule, with nothing per row in
    the driver and no Ray Data shuffle where the verified pairs fit one task: each pair's two
    signatures met by a hash join in Ray tasks (``bigopt.data.pair_join``), the verified pairs
    (keys and a similarity, a fraction of the candidates) clustered in one task, each member's
    similarity with its kept key by the same join. Verified pairs over the rule are clustered
    by min-label propagation on Ray Data (``bigopt.data.components``)."""
    import ray

    from bigopt.data import pair_join
    from bigopt.data.engine import fits_one_task, submit
    from bigopt.data.range_sort import block_refs

    pair_blocks = block_refs(pairs)
    signatures = pair_join.partition_signatures(block_refs(sigs), key, num_perm,
                                                sum(b for _, _, b in pair_blocks))
    edges, n_verified, edge_bytes = pair_join.similarities(pair_blocks, "a", "b", signatures,
                                                           min_sim=threshold)
    log.info("near_dedup: %d verified pairs (%.1f MB) from %d hash partitions", n_verified,
             edge_bytes / 2**20, signatures.parts)
    if n_verified == 0:
        return {"verified": 0, "clusters": 0, "rows_in_clusters": 0, "removed": 0, "examples": []}
    if fits_one_task(edge_bytes):
        labels_ref, members_ref, summary_ref = submit(_components_task, *edges, returns=3)
        summary = ray.get(summary_ref)
        members = [(members_ref, summary["rows_in_clusters"] - summary["clusters"],
                    summary["members_bytes"])]
        kept_of, removed, kept_bytes = pair_join.similarities(members, "m", "r", signatures)
        examples = ray.get(submit(_examples_task, summary["top"], *kept_of))
        return {"verified": n_verified, "labels": _one_side([labels_ref], summary["labels_bytes"]),
                "kept_of": _one_side(kept_of, kept_bytes), "clusters": summary["clusters"],
                "rows_in_clusters": summary["rows_in_clusters"], "removed": removed,
                "examples": examples}
    from bigopt.data.components import components

    edges_ds = ray.data.from_arrow_refs(edges).map_batches(
        lambda b: {"u": np.concatenate([b["a"], b["b"]]), "v": np.concatenate([b["b"], b["a"]])},
        batch_size=4096)
    labels = components(edges_ds.materialize(), parts)  # node -> its cluster's smallest key
    members = labels.filter(lambda r: r["node"] != r["label"]).map_batches(
        lambda b: {"m": b["node"], "r": b["label"]}, batch_size=65536).materialize()
    kept_of, removed, _ = pair_join.similarities(block_refs(members), "m", "r", signatures)
    kept_of_ds = ray.data.from_arrow_refs(kept_of)  # _mark_near sends it by reference if it fits
    return {"verified": n_verified, "labels": labels, "kept_of": kept_of_ds,
            "clusters": labels.filter(lambda r: r["node"] == r["label"]).count(),
            "rows_in_clusters": labels.count(), "removed": removed,
            "examples": _cluster_examples(labels, kept_of_ds, parts)}


def _near_reason_batch(batch: Any, key: str, hits: Any, action: str) -> Any:
    """Ray Data task: ``REASON`` (and ``group``) for each row from ``hits`` (an ``ObjectRef``
    of kept_of {m, r, sim} for drop, of labels {node, label} for group; fetched here): the
    broadcast side of the row decision."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import ray

    table = ray.get(hits)
    keys = pc.cast(batch[key], pa.string())
    at = pc.index_in(keys, value_set=table["m" if action != "group" else "node"])
    if action == "group":  # a member's cluster, else the row's own key
        return (batch.append_column(REASON, pa.array([""] * batch.num_rows, pa.string()))
                .append_column("group", pc.coalesce(table["label"].take(at), keys)))
    reasons = np.full(batch.num_rows, "", dtype=object)
    hit = np.flatnonzero(at.is_valid().to_numpy(zero_copy_only=False))
    if hit.size:  # strings for the members only (a tenth of the rows at 10 % near-copies)
        rows = at.take(pa.array(hit))
        roots, sims = table["r"].take(rows).to_pylist(), table["sim"].take(rows).to_pylist()
        reasons[hit] = [f"near_duplicate: ~J={sim:.2f} with {root}"
                        for root, sim in zip(roots, sims, strict=True)]
    return batch.append_column(REASON, pa.array(reasons, pa.string()))


def _mark_near(ds: Any, labels: Any, kept_of: Any, key: str, action: str, parts: int) -> Any:
    """Each row with its ``REASON`` ('' keeps it) and, for ``action: group``, its cluster:
    ``labels``/``kept_of`` (Datasets, or ``ObjectRef``s of tables from ``_cluster_task``) go
    to the tasks by reference where they fit one task, else are cogrouped with the rows."""
    import pyarrow as pa
    import ray

    from bigopt.data.components import cogroup
    from bigopt.data.engine import fits_one_task, submit

    hits = labels if action == "group" else kept_of
    if not isinstance(hits, ray.ObjectRef) and fits_one_task(hits.size_bytes()):
        hits = submit(_one_table, *hits.to_arrow_refs())
    if isinstance(hits, ray.ObjectRef):
        return ds.map_batches(_near_reason_batch, fn_kwargs={"key": key, "hits": hits,
                                                             "action": action},
                              batch_format="pyarrow", batch_size=None)
    s = pa.string()
    columns = {name: t for name, t in zip(ds.schema().names, ds.schema().types, strict=True)}
    if action == "group":
        return cogroup(ds, labels, key, "node", lambda k, rows, lab: [
            {**r, REASON: "", "group": lab[0]["label"] if lab else k} for r in rows],
            {**columns, REASON: s, "group": s}, parts)
    return cogroup(ds, kept_of, key, "m", lambda k, rows, hit: [
        {**r, REASON: f"near_duplicate: ~J={hit[0]['sim']:.2f} with {hit[0]['r']}" if hit
         else ""} for r in rows], {**columns, REASON: s}, parts)


def _no_reason(batch: dict[str, np.ndarray], key: str, group: bool) -> dict[str, np.ndarray]:
    batch[REASON] = np.array([""] * len(batch[key]), dtype=object)
    if group:
        batch["group"] = np.array([str(k) for k in batch[key]], dtype=object)
    return batch


def _cluster_examples(labels: Any, kept_of: Any, parts: int) -> list[dict[str, Any]]:
    """The EXAMPLES largest clusters (ties by root) with their first members by key, as the
    single path reports them: a running top-k over the cluster sizes (constant memory), then
    the members of those few clusters only."""
    from ray.data.aggregate import Count

    sizes = labels.groupby("label", num_partitions=parts).aggregate(Count(alias_name="n"))
    top = [(-n, str(root)) for n, root in top_groups(sizes, "label", "n")[0]]
    wanted = {root for _, root in top}
    similar: dict[str, list[tuple[str, float]]] = {root: [] for root in wanted}
    for row in kept_of.filter(lambda r: r["r"] in wanted).iter_rows():
        similar[row["r"]].append((row["m"], row["sim"]))
    return [{"kept": root, "rows": -n,
             "similar": [{"key": m, "jaccard": round(sim, 3)} for m, sim in sorted(similar[root])
                         ][:EXAMPLES]} for n, root in top]

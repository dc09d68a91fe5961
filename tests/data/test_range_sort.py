"""Range partitioning through Parquet (``bigopt.data.range_sort``): the same order as one
global sort, for seeded (hashed, uniform) and unseeded (identity strings) keys, with the rows of
every range counted and the scratch files gone afterwards."""

from __future__ import annotations

import numpy as np
import pytest

from bigopt.runtime import RunDir


@pytest.mark.parametrize("seeded", [True, False])
def test_ranges_sorted_one_by_one_give_the_global_order(ray_session, tmp_path, seeded):
    import pyarrow as pa
    import ray
    from pyarrow.fs import FileType

    from bigopt.data import range_sort

    rng = np.random.default_rng(0)
    n = 5000
    keys = (rng.integers(0, 2**63 - 1, n, dtype=np.int64) if seeded
            else np.array([f"pkg/m{int(k)}.py\0{int(k) % 7}" for k in rng.permutation(n)], object))
    blocks = [pa.table({"_order": keys[i:i + 400], "v": np.arange(i, min(n, i + 400))})
              for i in range(0, n, 400)]  # 13 blocks
    part = ray.data.from_arrow(blocks).materialize()
    run = RunDir(str(tmp_path)).stage("data")
    nbytes = part.size_bytes()
    # ~8 ranges through ~4 files: more than one of each, small enough to run in a second
    plan = range_sort.partition(part, run.fs, run.sub("_sort"), "_order", seeded=seeded,
                                range_bytes=nbytes // 8, group_bytes=nbytes // 4)
    assert plan.counts.shape[0] >= 3 and plan.counts.shape[1] >= 8
    assert sum(plan.range_rows) == n
    assert min(plan.range_rows) > 0.3 * n / plan.counts.shape[1]  # cut points spread the rows
    ranges = [ray.get(plan.sort(r)) for r in range(plan.counts.shape[1]) if plan.range_rows[r]]
    assert [t.num_rows for t in ranges] == [r for r in plan.range_rows if r]
    merged = pa.concat_tables(ranges)
    order = np.argsort(keys, kind="stable")
    assert merged.column("_order").to_pylist() == keys[order].tolist()
    assert merged.column("v").to_pylist() == np.arange(n)[order].tolist()
    plan.remove()
    assert run.fs.get_file_info(run.sub("_sort")).type == FileType.NotFound

"""regc runtime: load, run and benchmark compiled artifacts. Importing offers them to regc core."""

from regc.plugins import provide
from regc.runtime.artifact import open_artifact, run_npz
from regc.runtime.bench import bench, compare

provide("open_artifact", open_artifact)
provide("run_npz", run_npz)
provide("bench_artifact", bench)
provide("compare", compare)

__all__ = ["open_artifact", "run_npz", "bench", "compare"]

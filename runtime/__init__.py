"""regc runtime: load, run and benchmark compiled artifacts. Importing offers them to regc core."""

from regc.plugins import provide, register_command
from regc.runtime.artifact import open_artifact, run_npz
from regc.runtime.bench import bench, compare
from regc.runtime.bundle import EXPORT_COMMAND, export_bundle

provide("open_artifact", open_artifact)  # .onnx files, TVM folders and edge bundles
provide("run_npz", run_npz)
provide("bench_artifact", bench)
provide("compare", compare)
register_command(EXPORT_COMMAND)

__all__ = ["open_artifact", "run_npz", "bench", "compare", "export_bundle"]

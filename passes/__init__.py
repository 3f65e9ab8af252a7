"""regc passes: one module per technique. Importing this package imports (and so registers) every
public module in this folder; modules whose names start with '_' are helpers."""

import importlib
import pkgutil

for _m in pkgutil.iter_modules(__path__):
    if not _m.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_m.name}")

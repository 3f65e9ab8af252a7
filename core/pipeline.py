"""Pipelines: ordered pass lists written as text, validated against phases, run with verify-each.

Grammar (MLIR-like, round-trips through ``str``)::

    pipeline := step ("," step)*
    step     := NAME ( "{" option ("," option)* "}" )?
    option   := KEY "=" VALUE          # VALUE without , { } ; lists as a:b:c

Order is never changed: phases must be non-decreasing (canonicalize < reparam < regularize <
prune < lowrank < sparsify < quant < lower), and a wrong order is an error that says the legal one.
"""

from __future__ import annotations

import dataclasses
import re
import time
from typing import Any, Iterable

from regc.errors import ConfigError, PipelineError, RegcError
from regc.ir import Model
from regc.registry import PassContext, PassInfo, Phase, get_pass

__all__ = ["PassStep", "Pipeline", "parse_pipeline", "compress", "split_steps"]

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_\-]*")


@dataclasses.dataclass(frozen=True)
class PassStep:
    """One pass with its resolved config."""

    info: PassInfo
    config: Any

    @property
    def name(self) -> str:
        return self.info.name

    def __str__(self) -> str:
        defaults = self.info.config()
        opts = [
            f"{f.name}={_fmt(getattr(self.config, f.name))}"
            for f in dataclasses.fields(self.config)
            if getattr(self.config, f.name) != getattr(defaults, f.name)
        ]
        return self.name + ("{" + ",".join(opts) + "}" if opts else "")


@dataclasses.dataclass(frozen=True)
class Pipeline:
    steps: tuple[PassStep, ...]

    def __str__(self) -> str:
        return ",".join(str(s) for s in self.steps)

    @classmethod
    def parse(cls, text: str) -> "Pipeline":
        return parse_pipeline(text)

    @classmethod
    def of(cls, *items: tuple[str, dict[str, Any]] | str) -> "Pipeline":
        """Build from Python: ``Pipeline.of("fold_bn", ("prune", {"ratio": 0.3}))``."""
        steps = []
        for item in items:
            name, opts = (item, {}) if isinstance(item, str) else item
            info = get_pass(name)
            steps.append(PassStep(info, info.make_config(opts)))
        p = cls(tuple(steps))
        p.validate()
        return p

    def validate(self) -> None:
        """Raise PipelineError when a pass of an earlier phase follows a later one."""
        for prev, cur in zip(self.steps, self.steps[1:]):
            if cur.info.phase < prev.info.phase:
                legal = " < ".join(p.name.lower() for p in Phase)
                raise PipelineError(
                    f"pass '{cur.name}' ({cur.info.phase.name.lower()}) cannot run after "
                    f"'{prev.name}' ({prev.info.phase.name.lower()}): the legal order of phases is "
                    f"{legal}. Put '{cur.name}' before '{prev.name}'."
                )

    def run(self, model: Model, ctx: PassContext | None = None, *, verify: bool = True
            ) -> tuple[Model, list[dict[str, Any]]]:
        """Run every step on ``model`` (rewritten in place) and return it with per-pass records."""
        ctx = ctx or PassContext()
        records: list[dict[str, Any]] = []
        done: list[str] = []
        for step in self.steps:
            if step.info.needs_data:
                ctx.require_data(step.name)
            t0 = time.perf_counter()
            ctx.log(f"running pass {step}")
            try:
                result = step.info.fn(model, step.config, ctx)
                if verify:
                    result.model.verify()
            except RegcError as e:
                e.args = (f"pass '{step.name}'{_after(done)}: {e}",)
                raise
            except Exception as e:  # a pass bug: keep the cause, name where it happened
                raise PipelineError(
                    f"pass '{step.name}'{_after(done)} failed: {type(e).__name__}: {e}"
                ) from e
            model = result.model
            records.append({
                "pass": step.name,
                "text": str(step),
                "modified": result.modified,
                "seconds": round(time.perf_counter() - t0, 3),
                "stats": result.stats,
            })
            done.append(step.name)
        return model, records


def parse_pipeline(text: str) -> Pipeline:
    """Parse pipeline text; unknown passes and options raise with the closest match."""
    if not isinstance(text, str) or not text.strip():
        raise PipelineError("empty pipeline: give passes like 'fold_bn,prune{ratio=0.3}' (see 'regc passes')")
    steps = []
    for name, opts in split_steps(text.strip()):
        info = get_pass(name)
        steps.append(PassStep(info, info.make_config(opts)))
    p = Pipeline(tuple(steps))
    p.validate()
    return p


def compress(model: Model, passes: "str | Pipeline", *, data: Any = None, ctx: PassContext | None = None
             ) -> Model:
    """Run a pipeline (text or ``Pipeline``) on a copy-free model; returns the rewritten model."""
    pipeline = parse_pipeline(passes) if isinstance(passes, str) else passes
    if ctx is None:
        ctx = PassContext(data=data)
    elif data is not None:
        ctx.data = data
    model, _ = pipeline.run(model, ctx)
    return model


def split_steps(text: str) -> Iterable[tuple[str, dict[str, str]]]:
    """``'a{k=v},b'`` -> ``('a', {'k': 'v'}), ('b', {})``: names and raw option strings, syntax checked
    (the pipeline grammar; ``-t cuda{arch=sm_80}`` uses it too)."""
    i, n = 0, len(text)
    while i < n:
        m = _NAME.match(text, i)
        if not m:
            raise PipelineError(f"bad pipeline text at column {i + 1}: {text[i:i + 20]!r} (expected a pass name)")
        name = m.group(0)
        i = m.end()
        opts: dict[str, str] = {}
        if i < n and text[i] == "{":
            close = text.find("}", i)
            if close < 0:
                raise PipelineError(f"bad pipeline text: '{{' after '{name}' is never closed")
            body = text[i + 1:close]
            for item in filter(None, (s.strip() for s in body.split(","))):
                key, eq, value = item.partition("=")
                if not eq or not key.strip() or not value.strip():
                    raise ConfigError(f"{name}: option '{item}' must be KEY=VALUE")
                if key.strip() in opts:
                    raise ConfigError(f"{name}: option '{key.strip()}' given twice")
                opts[key.strip()] = value.strip()
            i = close + 1
        yield name, opts
        if i < n:
            if text[i] != ",":
                raise PipelineError(f"bad pipeline text at column {i + 1}: expected ',' between passes, got {text[i]!r}")
            i += 1
            if i == n:
                raise PipelineError("bad pipeline text: trailing ','")


def _fmt(v: Any) -> str:
    if isinstance(v, (tuple, list)):
        return ":".join(_fmt(x) for x in v)
    if isinstance(v, bool):
        return "true" if v else "false"
    if v is None:
        return "none"
    return str(v)


def _after(done: list[str]) -> str:
    return f" (after {', '.join(done)})" if done else " (first pass)"

"""`vlmtune merge`: the typed function behind the command, top to bottom: validate, write, check, export,
verify, publish.

Nothing is written before every input has been validated (`plan.build_plan`), and the output appears
only at the end, by renaming a temp folder beside it (`fsutil.atomic_dir`): an interrupted or failed merge
leaves no OUT. SIGTERM is turned into an exception for the duration, so `kill PID` cleans up the temp
folder too (SIGKILL cannot be caught: it leaves a `.OUT.tmp-*` folder beside OUT, never a partial OUT).
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import checkpoint
from ..fsutil import atomic_dir, check_output
from ..io import dtypes
from . import check as check_mod
from . import export, stream
from .lora_math import single_threaded_blas
from .plan import MergeError, Plan, build_plan, check_output_location


@dataclass
class MergeResult:
    """What a merge produced; `manifest` is the `vlmtune.json` written into `out`."""

    out: Path
    seconds: float
    bytes: int
    shards: list[str]
    tensors: dict[str, int]
    untied_lm_head: bool
    check: dict[str, Any]
    verification: dict[str, Any] | None
    warnings: list[str] = field(default_factory=list)
    manifest: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> str:
        t = self.tensors
        lines = [
            f"merged into {self.out} in {self.seconds:.1f}s: {len(self.shards)} shard(s), {self.bytes / 1e9:.2f} GB",
            f"  tensors: {t['merged']} merged, {t['replaced']} replaced (modules_to_save), {t['cast']} cast, "
            f"{t['copied']} copied",
            f"  check: {self.check['changed_tensors_checked']} changed tensors re-read and recomputed in float64 "
            f"({self.check['rows_checked']} rows): max error {self.check['max_error_over_tolerance']:.2f} of tolerance",
        ]
        if self.untied_lm_head:
            lines.append(
                "  lm_head written untied (the adapter changed it or the embeddings); tie_word_embeddings=false"
            )
        v = self.verification
        if v:
            lines.append(
                f"  verify: max |logit diff| {v['max_abs_logit_diff']:.2e} <= tolerance {v['tolerance']:.2e} "
                f"(adapter effect {v['adapter_effect']:.2e}; {v['device']}, {v['seconds']}s)"
            )
        lines += [f"  warning: {w}" for w in self.warnings]
        return "\n".join(lines)


@contextlib.contextmanager
def sigterm_raises() -> Iterator[None]:
    """Make SIGTERM unwind the stack (so the temp folder is removed) while the merge writes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def merge_warnings(plan: Plan, files: dict[str, Any], verification: dict[str, Any] | None) -> list[str]:
    """What the user should look at although the merge succeeded."""
    warnings = list(files["warnings"])
    for a in plan.adapters:
        warnings += a.warnings  # what the adapter rules warn about for use 'merge'
    if verification and not verification["discriminating"]:
        warnings.append(
            "the adapter changes the probe logits by less than the tolerance, so --verify could not tell the "
            "merged model from the base"
        )
    return warnings


def as_list(adapters: str | Path | Sequence[str | Path]) -> list[str | Path]:
    return [adapters] if isinstance(adapters, str | Path) else list(adapters)


def merge(
    base: str | Path,
    adapters: str | Path | Sequence[str | Path],
    out: str | Path,
    *,
    dtype: str = "auto",
    max_shard_size: str | int = "5GB",
    verify: bool = False,
    overwrite: bool = False,
    progress: Callable[[str], None] | None = None,
) -> MergeResult:
    """Merge one or more LoRA adapters (in order) into `base` and write a standalone model folder `out`.

    `base` and each adapter are local folders or hub ids. The output keeps the base's tensor names, order
    and (with dtype='auto') dtypes, so it is a drop-in replacement for the base. Raises a `VlmtuneError`
    before writing anything when the merge cannot be done faithfully, and when `verify` finds the merged
    model's logits off base + adapters beyond the dtype's tolerance (then no `out` is left behind).
    """
    t0 = time.perf_counter()
    out = Path(out)
    base_dir = checkpoint.resolve(base)
    adapter_dirs = [checkpoint.resolve(a) for a in as_list(adapters)]
    check_output_location(out, base_dir, adapter_dirs)
    check_output(out.absolute(), overwrite)
    plan = build_plan(base_dir, adapter_dirs, dtype, max_shard_size)
    fingerprint = checkpoint.fingerprint(base_dir)

    with sigterm_raises(), atomic_dir(out, overwrite) as tmp:
        try:
            with single_threaded_blas():
                stream.write_shards(plan, tmp, progress)
                check = check_mod.check_written(plan, tmp)
        except OSError as exc:  # disk full, permissions, a vanished input: the user's to fix
            raise MergeError(
                f"writing the merged model beside {out} failed: {exc}; nothing was written."
            ) from exc
        files = export.export_files(plan, tmp)
        verification = None
        if verify:
            float_dtypes = [t.dtype for t in plan.tensors if dtypes.is_float(t.dtype) and t.steps]
            float_dtypes = float_dtypes or [t.dtype for t in plan.tensors if dtypes.is_float(t.dtype)]
            dtype_key = min(float_dtypes, key=dtypes.FLOATS.index) if float_dtypes else "F32"
            from .verify import verify as run_verify

            verification = run_verify(base_dir, plan.adapters, tmp, dtype_key)
            if not verification["passed"]:
                raise MergeError(
                    f"--verify failed: the merged model's logits differ from base + adapter(s) un-merged by "
                    f"{verification['max_abs_logit_diff']:.3g} (tolerance {verification['tolerance']:.3g} for "
                    f"{dtypes.torch_name(dtype_key)}); {out} was not written."
                )
        warnings = merge_warnings(plan, files, verification)
        manifest = export.write_manifest(
            plan, tmp, str(base), fingerprint, check, files, verification, warnings
        )
    return MergeResult(
        out=out,
        seconds=time.perf_counter() - t0,
        bytes=plan.total_bytes,
        shards=plan.shard_files,
        tensors=plan.counts(),
        untied_lm_head=plan.untie,
        check=check,
        verification=verification,
        warnings=warnings,
        manifest=manifest,
    )

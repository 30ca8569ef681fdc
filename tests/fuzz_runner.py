"""Run one group of the fuzz corpus (tests/fuzz_cases.py) in this process.

    python tests/fuzz_runner.py --assets DIR --work DIR --group train
    python tests/fuzz_runner.py --assets DIR --work DIR --case train.config.lr_zero [NAME ...]

DIR is created (the synthetic corpus) where missing.

Each case runs through its tool's `main(argv)`, exactly what `python tools/<tool>.py`
runs (main -> run_tool), with stdout and stderr captured; an exception escaping
`main` is caught and reported as a traceback. Importing torch once for a whole
group is what keeps ~400 cases within a minute or two. One JSON line per case,
``FUZZ-RESULT {...}``, goes to the real stdout (``FUZZ-START <name>`` before it,
so a case that hangs or kills the process can be named).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import signal
import sys
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.fuzz_cases import BY_NAME, CASES, Assets, Case, Ctx, judge, load_tool, quiet_logging  # noqa: E402

TAIL = 2500


class CaseTimeout(BaseException):
    """A case ran past its time limit (a BaseException, so no `except Exception` swallows it)."""


def _on_alarm(signum: int, frame: object) -> None:
    raise CaseTimeout()


def where(exc: BaseException) -> str:
    """The innermost frame of the project's own code that the exception passed through."""
    frames = traceback.extract_tb(exc.__traceback__)
    own = [f for f in frames if f.filename.startswith(str(REPO)) and "/tests/" not in f.filename
           and "/.venv/" not in f.filename]
    frame = (own or frames or [None])[-1]
    if frame is None:
        return "?"
    return f"{os.path.relpath(frame.filename, REPO)}:{frame.lineno} in {frame.name}"


def run_case(case: Case, assets: Assets, work: Path) -> dict:
    """Build the case's inputs, run its tool in-process and judge the outcome."""
    tmp = work / case.name
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    ctx = Ctx(tmp, assets)
    result: dict = {"name": case.name, "tool": case.tool, "group": case.group, "expect": case.expect}
    reason = case.requires() if case.requires else None
    if reason:
        result["skipped"] = reason
        return result
    cwd = os.getcwd()
    os.chdir(tmp)
    try:
        try:
            argv = case.build(ctx)
        except Exception as err:  # noqa: BLE001
            result["harness"] = f"building the case failed: {type(err).__name__}: {err} at {where(err)}"
            return result
        finally:
            quiet_logging()
        result["argv"] = argv
        try:
            module = load_tool(case.tool)
        except BaseException as exc:  # noqa: BLE001  (a tool that does not even import)
            result["harness"] = f"tools/{case.tool}.py does not import: {type(exc).__name__}: {exc}"
            return result
        out, err = io.StringIO(), io.StringIO()
        sys.argv = [str(REPO / "tools" / f"{case.tool}.py"), *argv]
        start = time.perf_counter()
        signal.signal(signal.SIGALRM, _on_alarm)
        signal.alarm(case.timeout)
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                try:
                    status = module.main(argv)
                except SystemExit as exit_:  # argparse
                    status = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
        except CaseTimeout:
            result["harness"] = f"did not finish within {case.timeout}s (argv {argv})"
            status = None
        except Exception as exc:  # noqa: BLE001  (everything the tool lets escape is a finding)
            status = None
            result["exception"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:400]
            result["where"] = where(exc)
            result["traceback"] = traceback.format_exc()[-TAIL:]
        finally:
            signal.alarm(0)
            quiet_logging()
        result.update(status=status, seconds=round(time.perf_counter() - start, 2),
                      stdout=out.getvalue(), stderr=err.getvalue())
        if case.check is not None and "harness" not in result:
            try:
                result["check_problems"] = case.check(ctx)
            except Exception as exc:  # noqa: BLE001
                result["harness"] = f"the case's check failed: {type(exc).__name__}: {exc}"
    finally:
        os.chdir(cwd)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--assets", required=True, help="folder with the synthetic corpus (Assets.prepare)")
    parser.add_argument("--work", required=True, help="folder for the cases' own files")
    parser.add_argument("--group", default=None, help="run this group's cases")
    parser.add_argument("--case", nargs="*", default=None, help="run these cases (names)")
    args = parser.parse_args(argv)
    unknown = [n for n in args.case or () if n not in BY_NAME]
    if unknown or not (args.case or args.group):
        parser.error(f"unknown cases {unknown}" if unknown else "give --group or --case")
    os.environ.pop("GADMS_DEBUG", None)
    assets = Assets.prepare(args.assets)
    cases = [BY_NAME[n] for n in args.case] if args.case else [c for c in CASES if c.group == args.group]
    real_stdout = sys.stdout
    for case in cases:
        print(f"FUZZ-START {case.name}", file=real_stdout, flush=True)
        result = run_case(case, assets, Path(args.work))
        if "skipped" not in result:
            verdict = judge(case, result)
            result["verdict"] = list(verdict) if verdict else None
            if verdict is None:
                # A passed case's files are not needed (a training case leaves ~130 MB of checkpoints);
                # a failed one's stay for inspection.
                shutil.rmtree(Path(args.work) / case.name, ignore_errors=True)
        for key in ("stdout", "stderr"):
            if key in result:
                result[key] = result[key][-TAIL:]
        print("FUZZ-RESULT " + json.dumps(result), file=real_stdout, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""Crash safety: SIGKILL a training run at random points, resume it, compare with an uninterrupted run.

Writes a small synthetic corpus, trains the tiny pretraining preset once without
interruption (the reference, also timed), then trains it again into a second run
folder, SIGKILLing the process N times and restarting the same command
(``train.resume=auto``) after each kill until a start exits 0 on its own. The final
``last.pth`` weights, ``score_cache.npy`` and ``metrics.jsonl`` of both runs are
then compared; resume is bit-exact on CPU, so every difference is a bug.

Kill moments come from a seeded RNG. A "time" kill lands uniformly over the
wall time the start is expected to take, read off the reference run's log: all
of it for a fresh start, else its start-up plus what came after the last saved
epoch. A "save" kill (``--save-fraction`` of the kills) waits for a uniform moment
too, then for the first temp file of a checkpoint write in the run folder
(``.last.pth.<pid>@<host>.<rand>.tmp``, ``.best_<set>.pth...``; the folder is polled
every ``--poll-ms``) and kills within the next 0-50 ms, so kills hit checkpoint
writes in progress. A kill counts when it was delivered (the process was still
running and died of it) and as "during a write" when a temp file of that process
was present just before it (temps left by earlier, killed starts do not count).

A run folder (``crashy-1``, ...) takes ``--kills-per-run`` kills, then restarts
until a start exits 0 on its own; the next kills go to a fresh folder, so kills
land in every phase of a run, not only in the start-up of resumed starts. A
start that finishes before its kill ends its run early. Every finished run is
compared with the reference. A start that fails on its own (non-zero exit not
caused by a kill, e.g. a checkpoint it cannot read, or the run folder still
locked) is reported with its log tail and retried once; a second failure in a
row abandons that run.

    python bench/crash_resume.py [--kills N] [--seed S] [--keep DIR] [--kills-per-run K]

Exit status 1 when a run differs from the reference (weights, score cache or
metric records), an epoch's training record is missing or duplicated, or a
start failed.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import datetime
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from datasets.synthetic import SyntheticConfig, generate  # noqa: E402

EPOCHS = 3
OVERRIDES = ("data.batch_size=16", "data.test_batch_size=64", f"solver.epochs={EPOCHS}", "train.max_steps=4",
             "solver.warmup_epochs=1", "log_period=1")
# The writer's pid/host/random part of a checkpoint temp name (utils/checkpoint.atomic_write).
_TMP_ID = re.compile(r"\.(\d+)@.+\.[^.]+\.tmp$")
# Failure messages that mean a restart could not read what a killed run left behind.
_CORRUPT_HINTS = ("cannot read checkpoint", "UnpicklingError", "PytorchStreamReader", "not a training checkpoint",
                  "EOFError", "JSONDecodeError", "ScoreCache:")
MAX_STARTS_PER_RUN = 60


@dataclasses.dataclass
class Start:
    """One start of the training command and how it ended."""

    run: int
    index: int
    mode: str  # "time", "save" or "none" (no kill planned)
    planned: float  # seconds after the start when the kill was due (save kills: when the wait for a save began)
    elapsed: float = 0.0
    returncode: int | None = None
    killed: bool = False
    during_save: bool = False
    temps: tuple[str, ...] = ()
    log: Path | None = None
    began: float = 0.0  # wall clock at the start

    def describe(self) -> str:
        if self.killed:
            where = f", during a write of {', '.join(self.temps)}" if self.during_save else ""
            return f"{self.mode} kill at {self.elapsed:5.2f} s{where}"
        plan = f" (its {self.mode} kill was due at {self.planned:.2f} s)" if self.mode != "none" else ""
        return f"exited {self.returncode} after {self.elapsed:5.2f} s{plan}"


def train_command(data_root: Path, run_dir: Path) -> list[str]:
    return [sys.executable, str(REPO / "tools" / "train.py"), "--config",
            str(REPO / "configs" / "demo" / "tiny_pretrain.yaml"), f"data.root={data_root}",
            f"output_dir={run_dir}", *OVERRIDES]


def temp_files(run_dir: Path) -> list[str]:
    """Temp files of atomic writes in `run_dir`: in progress or left behind by killed writers."""
    try:
        return sorted(e.name for e in os.scandir(run_dir) if ".tmp" in e.name)
    except FileNotFoundError:
        return []


def writes_in_progress(run_dir: Path, pid: int, began: float) -> list[str]:
    """Temp files that process `pid`, started at `began`, is writing (not those of earlier, killed starts).

    Checkpoint temps name their writer's pid; other temps (``config.yaml.tmp``, score-cache
    snapshots) count when they were modified since the start.
    """
    found = []
    for name in temp_files(run_dir):
        match = _TMP_ID.search(name)
        if match is not None:
            if int(match.group(1)) == pid:
                found.append(name)
            continue
        try:
            if os.stat(run_dir / name).st_mtime >= began:
                found.append(name)
        except FileNotFoundError:
            pass
    return found


def is_checkpoint_temp(name: str) -> bool:
    """`.last.pth.<pid>@<host>.<rand>.tmp`, `.best_CUHK-PEDES.pth....tmp` (see utils/checkpoint.atomic_write)."""
    return ".pth." in name and name.endswith(".tmp")


def written_file(temp_name: str) -> str:
    """The file a temp file stands for: `.last.pth.123@host.ab12.tmp` -> `last.pth`."""
    name = _TMP_ID.sub("", temp_name)
    return name[1:] if name.startswith(".") and name != temp_name else name


_SAVED_LAST = re.compile(r"^(\S+ \S+) INFO utils\.checkpoint: saved checkpoint .*last\.pth \(epoch (\d+),")


@dataclasses.dataclass
class Timeline:
    """When things happened in the uninterrupted run, in seconds after its start."""

    total: float
    startup: float  # until the run's first log line
    last_saved: dict[int, float]  # epoch -> `last.pth` of that epoch written

    def expected(self, epoch_saved: int | None) -> float:
        """Expected wall time of a start that resumes after `epoch_saved` (None: a fresh start)."""
        if epoch_saved is None or epoch_saved not in self.last_saved:
            return self.total
        return self.startup + self.total - self.last_saved[epoch_saved]


def log_time(line: str) -> float:
    return datetime.datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()


def reference_timeline(train_log: Path, began: float, total: float) -> Timeline:
    lines = train_log.read_text(errors="replace").splitlines()
    saved = {int(m.group(2)): log_time(line) - began for line in lines if (m := _SAVED_LAST.match(line))}
    return Timeline(total=total, startup=log_time(lines[0]) - began, last_saved=saved)


def epoch_saved(run_dir: Path) -> int | None:
    """The epoch of the newest `last.pth` the run folder's log reports (None: none yet).

    Read from train.log, not the checkpoint (loading it takes seconds): a kill between the
    rename and the log line makes this one epoch early, which only lengthens the estimate.
    """
    log = run_dir / "train.log"
    if not log.is_file():
        return None
    found = [int(m.group(2)) for line in log.read_text(errors="replace").splitlines()
             if (m := _SAVED_LAST.match(line))]
    return found[-1] if found else None


def run_start(cmd: list[str], env: dict[str, str], run_dir: Path, start: Start, rng: random.Random,
              poll_s: float) -> Start:
    """Start `cmd` and kill it as `start` plans (or let it finish)."""
    with open(start.log, "wb") as log:
        start.began = time.time()
        begin = time.monotonic()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        due: float | None = None if start.mode == "none" else start.planned
        waiting_for_save = start.mode == "save"
        while proc.poll() is None:
            now = time.monotonic() - begin
            if due is not None and now >= due:
                if waiting_for_save:
                    # Once a checkpoint's temp file appears, kill within the next 0-50 ms.
                    if any(is_checkpoint_temp(t) for t in writes_in_progress(run_dir, proc.pid, start.began)):
                        waiting_for_save = False
                        due = now + rng.uniform(0.0, 0.05)
                else:
                    temps = writes_in_progress(run_dir, proc.pid, start.began)
                    os.kill(proc.pid, signal.SIGKILL)
                    proc.wait()
                    start.during_save = bool(temps)
                    start.temps = tuple(written_file(t) for t in temps)
                    break
            time.sleep(poll_s)
        start.elapsed = time.monotonic() - begin
    start.returncode = proc.returncode
    start.killed = proc.returncode == -signal.SIGKILL
    if not start.killed:
        start.during_save, start.temps = False, ()
    return start


def yes(flag: bool) -> str:
    return "yes" if flag else "NO"


def log_tail(path: Path, lines: int = 12) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def read_records(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def compare(reference: Path, run_dir: Path) -> dict:
    """Differences between two finished run folders."""
    ref = torch.load(reference / "last.pth", weights_only=True)
    got = torch.load(run_dir / "last.pth", weights_only=True)
    ref_model, got_model = ref["model"], got["model"]
    if ref_model.keys() != got_model.keys():
        weight_diff = float("inf")
    else:
        weight_diff = max((ref_model[k].double() - got_model[k].double()).abs().max().item() for k in ref_model)
    cache_diff = float(np.abs(np.load(reference / "score_cache.npy").astype(np.float64)
                              - np.load(run_dir / "score_cache.npy").astype(np.float64)).max())
    records = read_records(run_dir)
    train_epochs = [r["epoch"] for r in records if r.get("type") == "train"]
    evals = [(r["epoch"], r["split"], r["task"]) for r in records if r.get("type") == "eval"]

    def untimed(rows: list[dict]) -> list[dict]:
        return [{k: v for k, v in r.items() if k != "time"} for r in rows]

    return {
        "weight_diff": weight_diff,
        "step": (ref["step"], got["step"]),
        "cache_diff": cache_diff,
        "train_epochs": train_epochs,
        "epochs_once": train_epochs == list(range(EPOCHS)),
        "evals_once": len(evals) == len(set(evals)),
        "records_equal": untimed(read_records(reference)) == untimed(records),
        "leftover_temps": temp_files(run_dir),
        "stale_removed": (run_dir / "train.log").read_text(errors="replace").count("removed stale temporary"),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kills", type=int, default=20, help="SIGKILLs to deliver in all")
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill moments")
    parser.add_argument("--keep", type=Path, default=None, help="work in this folder and keep it (default: a temp folder)")
    parser.add_argument("--kills-per-run", type=int, default=5,
                        help="kills per run folder; then it runs to the end and the next kills go to a fresh one")
    parser.add_argument("--save-fraction", type=float, default=0.4, help="share of the kills aimed at a save")
    parser.add_argument("--poll-ms", type=float, default=3.0, help="run-folder polling interval")
    args = parser.parse_args(argv)

    work = args.keep if args.keep is not None else Path(tempfile.mkdtemp(prefix="crash_resume_"))
    work.mkdir(parents=True, exist_ok=True)
    if any(work.iterdir()):
        parser.error(f"--keep {work}: the folder is not empty")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    rng = random.Random(args.seed)
    poll_s = args.poll_ms / 1000
    logs = work / "logs"
    logs.mkdir()
    try:
        data_root = work / "data"
        generate(data_root, SyntheticConfig(identities=24, images_per_id=3, val_ids=8, test_ids=8,
                                            webperson_images=96, shard_size=48, seed=3), workers=1)
        straight = work / "straight"
        cmd = train_command(data_root, straight)
        print("command: OMP_NUM_THREADS=1 " + " ".join(Path(c).name if c == sys.executable else c for c in cmd))
        reference = run_start(cmd, env, straight, Start(0, 0, "none", 0.0, log=logs / "straight.log"), rng, poll_s)
        if reference.returncode != 0:
            print(f"reference run failed (exit {reference.returncode}):\n{log_tail(reference.log)}")
            return 1
        timeline = reference_timeline(straight / "train.log", reference.began, reference.elapsed)
        print(f"uninterrupted run: {timeline.total:.1f} s wall (first log line at {timeline.startup:.1f} s; "
              f"last.pth of epoch {', '.join(f'{e} at {t:.1f} s' for e, t in sorted(timeline.last_saved.items()))})")

        crash_begin = time.monotonic()
        starts: list[Start] = []
        failures: list[Start] = []
        results: list[tuple[int, int, dict | None]] = []
        kills_left, run = args.kills, 0
        while kills_left > 0:
            run += 1
            run_dir = work / f"crashy-{run}"
            failed_in_row, finished, run_kills = 0, False, 0
            for index in range(MAX_STARTS_PER_RUN):
                mode = "none"
                if kills_left > 0 and run_kills < args.kills_per_run:
                    mode = "save" if rng.random() < args.save_fraction else "time"
                # Uniform over what this start is expected to take: all of it when fresh, else
                # the start-up plus the epochs left after the last saved one.
                planned = rng.uniform(0.0, timeline.expected(epoch_saved(run_dir))) if mode != "none" else 0.0
                start = Start(run, index, mode, planned, log=logs / f"crashy-{run}-start{index}.log")
                run_start(train_command(data_root, run_dir), env, run_dir, start, rng, poll_s)
                starts.append(start)
                print(f"crashy-{run} start {index:2d}: {start.describe()}", flush=True)
                if start.killed:
                    kills_left -= 1
                    run_kills += 1
                    failed_in_row = 0
                elif start.returncode == 0:
                    finished = True
                    break
                else:
                    failures.append(start)
                    print(f"  start failed on its own, log tail:\n{log_tail(start.log)}")
                    failed_in_row += 1
                    if failed_in_row == 2:
                        print(f"  crashy-{run}: two failed starts in a row, run abandoned")
                        break
            results.append((run, run_kills, compare(straight, run_dir) if finished else None))

        killed = [s for s in starts if s.killed]
        in_save = [s for s in killed if s.during_save]
        saves = collections.Counter(name for s in in_save for name in s.temps)
        corrupt = [s for s in failures if any(h in s.log.read_text(errors="replace") for h in _CORRUPT_HINTS)]
        ok = not failures
        print()
        in_checkpoint = [s for s in in_save if any(t.endswith(".pth") for t in s.temps)]
        print(f"kills delivered   {len(killed)} (time kills {sum(s.mode == 'time' for s in killed)}, save kills "
              f"{sum(s.mode == 'save' for s in killed)}); during a write: {len(in_save)}, "
              f"of a checkpoint: {len(in_checkpoint)}")
        if saves:
            print(f"being written     {', '.join(f'{n} x{c}' for n, c in sorted(saves.items()))}")
        print(f"runs / starts     {run} / {len(starts)}, so {len(starts) - run} restarts "
              f"({time.monotonic() - crash_begin:.0f} s wall)")
        print(f"failed starts     {len(failures)} (could not read a checkpoint or cache: {len(corrupt)})")
        for number, run_kills, result in results:
            if result is None:
                ok = False
                print(f"crashy-{number} ({run_kills} kills): did not finish")
                continue
            same = result["weight_diff"] == 0 and result["cache_diff"] == 0 and result["step"][0] == result["step"][1]
            ok = ok and same and result["epochs_once"] and result["evals_once"] and result["records_equal"]
            print(f"crashy-{number} ({run_kills} kills): max |weight diff| {result['weight_diff']:.3g}, "
                  f"max |score cache diff| {result['cache_diff']:.3g}, step {result['step'][1]}/{result['step'][0]}, "
                  f"train epochs {result['train_epochs']}, eval records once {yes(result['evals_once'])}, "
                  f"metric records = reference {yes(result['records_equal'])}, "
                  f"stale temps removed {result['stale_removed']}, left {len(result['leftover_temps'])}")
        print(f"crash-resumed runs equal the uninterrupted run: {'yes' if ok else 'NO'}")
        return 0 if ok else 1
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"kept {work}")


if __name__ == "__main__":
    sys.exit(main())

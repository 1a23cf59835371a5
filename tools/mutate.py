"""Mutation testing of the algorithm modules, each against its own test files (``make mutate``; not part of
``make test``).

For every module of :data:`MODULES` whose file exists, Cosmic Ray (https://cosmic-ray.readthedocs.io)
lists the mutants (an operator flipped, a number or a comparison changed, a loop run zero times...),
the mutants inside type annotations are left out (the modules use ``from __future__ import
annotations``: an annotation is a string at run time, so such a mutant cannot change behaviour), a
seeded sample of ``--sample`` of the rest is run, and each mutant counts as *killed* when the module's
test files fail (or time out) with it in place. Everything runs in a copy of the repository under
``--workdir``: the checkout is never mutated. The kill rate per module, and every surviving mutant's
diff, go to ``<workdir>/results.json`` and ``<workdir>/survivors/<module>.diff``.

    python tools/mutate.py                              # every module, 50 mutants each (seed 0)
    python tools/mutate.py --sample 0 lightning_interp/losses.py   # every mutant of one module

A new module: add a line to :data:`MODULES` (its path and its test files).
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

#: module → the test files that are its oracle (the house rule: lightning_interp/x.py → tests/test_x.py).
MODULES: dict[str, list[str]] = {
    "lightning_interp/losses.py": ["tests/test_losses.py"],
    "lightning_interp/metrics/aipc.py": ["tests/test_aipc.py"],
    "lightning_interp/metrics/fq.py": ["tests/test_fq.py"],
    "lightning_interp/overfitting.py": ["tests/test_overfitting.py"],
    "lightning_interp/scores.py": ["tests/test_scores.py"],
    "lightning_interp/pruning.py": ["tests/test_pruning.py"],
    "lightning_interp/dynamics.py": ["tests/test_dynamics.py"],
}


# ---- a fork server: torch, Lightning and the test dependencies are imported once, each mutant's tests run
# in a forked child that imports lightning_interp (the mutated file) and the tests afresh. Cosmic Ray's test
# command is then a small client (`mutate.py --client SOCKET ARGS`) that costs no import of torch.


def serve(sock_path: str, timeout: float) -> None:
    """Answer each request (pytest arguments, JSON) with the exit code of pytest run in a forked child."""
    import socket

    sys.dont_write_bytecode = True
    import pytest

    import lightning_interp.callbacks  # noqa: F401  (warm every third-party import the package makes)

    for name in [m for m in sys.modules if m == "lightning_interp" or m.startswith("lightning_interp.")]:
        del sys.modules[name]
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(sock_path)
    server.listen(1)
    while True:
        conn, _ = server.accept()
        with conn:
            args = json.loads(conn.makefile().readline())
            if args is None:
                return
            pid = os.fork()
            if pid == 0:  # the child: fresh package and tests, output discarded
                devnull = os.open(os.devnull, os.O_WRONLY)
                os.dup2(devnull, 1)
                os.dup2(devnull, 2)
                code = 1
                try:
                    code = int(pytest.main(args))
                finally:
                    os._exit(code)
            deadline = time.monotonic() + timeout
            while True:
                done, status = os.waitpid(pid, os.WNOHANG)
                if done:
                    code = os.waitstatus_to_exitcode(status)
                    break
                if time.monotonic() > deadline:
                    os.kill(pid, 9)
                    os.waitpid(pid, 0)
                    code = 124
                    break
                time.sleep(0.02)
            conn.sendall(f"{code}\n".encode())


def ask(sock_path: str, args: list[str] | None) -> int:
    """Send pytest arguments to the server (None: stop it); its exit code."""
    import socket

    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.connect(sock_path)
        conn.sendall((json.dumps(args) + "\n").encode())
        answer = conn.makefile().readline()
    return int(answer) if answer else 3  # no answer: the server died (run_all then stops with an error)


def copy_repo(dest: Path) -> None:
    """The tracked and untracked-but-not-ignored files of the checkout, copied to ``dest``."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, check=True,
                           capture_output=True, text=True).stdout.split("\0")
    if dest.exists():
        shutil.rmtree(dest)
    for name in filter(None, files):
        src = REPO / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)


def annotation_spans(source: str) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    """(start, end) positions (line 1-based, column 0-based) of every annotation in ``source``."""
    spans = []
    for node in ast.walk(ast.parse(source)):
        notes = []
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            a = node.args
            notes = [arg.annotation for arg in (*a.posonlyargs, *a.args, *a.kwonlyargs, a.vararg, a.kwarg)
                     if arg is not None] + [node.returns]
        elif isinstance(node, ast.AnnAssign):
            notes = [node.annotation]
        spans += [((n.lineno, n.col_offset), (n.end_lineno, n.end_col_offset)) for n in notes if n is not None]
    return spans


def inside(pos: tuple[int, int], end: tuple[int, int], spans) -> bool:
    return any(s <= tuple(pos) and tuple(end) <= e for s, e in spans)


def run_module(module: str, tests: list[str], work: Path, out: Path, sample: int, seed: int, timeout: float,
               sock: str) -> dict:
    """Run a seeded sample of ``module``'s mutants against ``tests`` in the copy ``work``; survivors' diffs to ``out``."""
    from cosmic_ray.work_db import WorkDB, use_db
    from cosmic_ray.work_item import TestOutcome, WorkerOutcome, WorkResult

    name = module.removeprefix("lightning_interp/").removesuffix(".py").replace("/", ".")
    pytest_args = ["-x", "-q", "-p", "no:cacheprovider", *tests]
    start = time.perf_counter()
    code = ask(sock, pytest_args)
    base_s = time.perf_counter() - start
    if code != 0:
        raise SystemExit(f"{module}: its tests fail before any mutation (exit code {code}): run "
                         f"`pytest {' '.join(tests)}`.")
    test_command = f"{sys.executable} {Path(__file__).resolve()} --client {sock} {' '.join(pytest_args)}"
    config, session = out / f"{name}.toml", out / f"{name}.sqlite"
    config.write_text(
        "[cosmic-ray]\n"
        f'module-path = "{module}"\n'
        f"timeout = {timeout + 30:.0f}\n"  # the server stops a mutant's tests after `timeout`
        "excluded-modules = []\n"
        f'test-command = "{test_command}"\n\n'
        "[cosmic-ray.distributor]\n"
        'name = "local"\n'
    )
    cosmic_ray = [sys.executable, "-m", "cosmic_ray.cli"]
    subprocess.run([*cosmic_ray, "init", str(config), str(session), "--force"], cwd=work, check=True)

    source = (work / module).read_text()
    # Annotations are strings at run time only under the __future__ import; otherwise they are evaluated.
    spans = annotation_spans(source) if "from __future__ import annotations" in source else []
    with use_db(str(session), WorkDB.Mode.open) as db:
        items = list(db.pending_work_items)
        annotations = [w for w in items if all(inside(m.start_pos, m.end_pos, spans) for m in w.mutations)]
        # Sorted by what the mutant is (job ids are random per init): the same seed picks the same mutants.
        rest = sorted((w for w in items if w not in annotations),
                      key=lambda w: [(m.operator_name, m.occurrence, tuple(m.start_pos)) for m in w.mutations])
        chosen = rest if not sample or sample >= len(rest) else random.Random(seed).sample(rest, sample)
        chosen_ids = {w.job_id for w in chosen}
        for w in items:
            if w.job_id not in chosen_ids:
                db.set_result(w.job_id, WorkResult(worker_outcome=WorkerOutcome.SKIPPED))
    print(f"{module}: {len(items)} mutants, {len(annotations)} in annotations, running {len(chosen)} "
          f"(tests {base_s:.1f} s, timeout {timeout:.0f} s)", flush=True)
    subprocess.run([*cosmic_ray, "exec", str(config), str(session)], cwd=work, check=True)

    survivors, killed, incompetent = [], 0, 0
    with use_db(str(session), WorkDB.Mode.open) as db:
        for item, result in db.completed_work_items:
            if item.job_id not in chosen_ids:
                continue
            if result.worker_outcome != WorkerOutcome.NORMAL or result.test_outcome == TestOutcome.INCOMPETENT:
                incompetent += 1  # the mutant could not be applied or run (not counted either way)
            elif result.test_outcome == TestOutcome.KILLED:
                killed += 1
            else:
                m = item.mutations[0]
                survivors.append({"job": item.job_id, "operator": m.operator_name, "line": m.start_pos[0],
                                  "diff": result.diff})
    run = killed + len(survivors)
    (out / "survivors").mkdir(exist_ok=True)
    (out / "survivors" / f"{name}.diff").write_text(
        "".join(f"# job {s['job']}, {s['operator']}, line {s['line']}\n{s['diff']}\n" for s in survivors))
    return {"module": module, "tests": tests, "mutants": len(items), "in_annotations": len(annotations),
            "sampled": len(chosen), "seed": seed, "killed": killed, "survived": len(survivors),
            "incompetent": incompetent, "kill_rate": killed / run if run else None,
            "survivors": [{k: s[k] for k in ("job", "operator", "line")} for s in survivors]}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--client"]:  # Cosmic Ray's test command: exit with the tests' exit code
        raise SystemExit(ask(argv[1], argv[2:]))
    if argv[:1] == ["--serve"]:
        sys.path.insert(0, os.getcwd())
        serve(argv[1], float(argv[3]))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("modules", nargs="*", help=f"modules to mutate (default: those of MODULES that exist: {list(MODULES)})")
    parser.add_argument("--sample", type=int, default=50, help="mutants run per module, seeded (0: all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds a mutant's tests may run")
    parser.add_argument("--workdir", type=Path, default=REPO / ".mutation")
    args = parser.parse_args(argv)
    modules = args.modules or [m for m in MODULES if (REPO / m).exists()]
    unknown = [m for m in modules if m not in MODULES]
    if unknown:
        parser.error(f"Expected modules among {list(MODULES)} but got {unknown}.")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("WANDB_SILENT", "true")
    work = args.workdir.resolve()
    copy_repo(work / "repo")
    os.environ["PYTHONPATH"] = str(work / "repo")  # the copy's package, not an installed one
    os.environ["PYTHONDONTWRITEBYTECODE"] = "1"
    sock = str(work / "pytest.sock")
    if os.path.exists(sock):
        os.remove(sock)
    server = subprocess.Popen([sys.executable, __file__, "--serve", sock, "--timeout", str(args.timeout)],
                              cwd=work / "repo")
    while not os.path.exists(sock):
        if server.poll() is not None:
            raise SystemExit("the test server did not start")
        time.sleep(0.2)
    try:
        run_all(args, modules, work, sock, server)
    finally:
        if server.poll() is None:
            ask(sock, None)
        server.wait()


def run_all(args: argparse.Namespace, modules: list[str], work: Path, sock: str, server: subprocess.Popen) -> None:
    results_path = work / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    for module in modules:
        tests = [t for t in MODULES[module] if (work / "repo" / t).exists()]
        if not tests:
            print(f"{module}: skipped, none of its test files {MODULES[module]} exists", flush=True)
            continue
        r = run_module(module, tests, work / "repo", work, args.sample, args.seed, args.timeout, sock)
        if server.poll() is not None:  # every mutant after its death would count as killed
            raise SystemExit(f"{module}: the test server died during the run; its results are not valid.")
        results[module] = r
        results_path.write_text(json.dumps(results, indent=1))
        rate = "n/a" if r["kill_rate"] is None else f"{100 * r['kill_rate']:.0f} %"
        print(f"{module}: killed {r['killed']} of {r['killed'] + r['survived']} ({rate}), "
              f"{r['incompetent']} not runnable; survivors in {work}/", flush=True)


if __name__ == "__main__":
    main()

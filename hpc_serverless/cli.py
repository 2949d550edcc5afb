"""The `hpc-serverless` command: run programs and look after them from a shell.

Exit codes: 0 success, 1 an error with a one-line reason, 2 a usage error,
3 `result` of a job that failed or was stopped.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from hpc_serverless.core.errors import HPCServerlessError, JobFailedError


def _serverless(args: argparse.Namespace) -> Any:
    from hpc_serverless.api import QuantumServerless

    config = args.config or os.environ.get("HPC_SERVERLESS_CONFIG")
    if not config and Path("serverless.yaml").exists():
        config = "serverless.yaml"
    s = QuantumServerless.load_configuration(config) if config else QuantumServerless()
    if args.provider:
        s.set_provider(args.provider)
    return s


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def cmd_run(args: argparse.Namespace) -> int:
    from hpc_serverless.programs import Program

    arguments: dict[str, Any] = json.loads(args.arguments) if args.arguments else {}
    if not isinstance(arguments, dict):
        raise HPCServerlessError("--arguments must be a JSON object")
    for item in args.arg or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise HPCServerlessError(f"--arg takes key=value, not {item!r}")
        arguments[key] = _parse_value(value)
    target = json.loads(args.target) if args.target else None
    entry = Path(args.entrypoint)
    working_dir = args.working_dir or str(entry.parent or ".")
    entrypoint = str(entry.relative_to(working_dir)) if args.working_dir is None else args.entrypoint
    program = Program(title=args.title or entry.stem, entrypoint=entrypoint, working_dir=working_dir,
                      target=target)
    s = _serverless(args)
    provider = s.default_provider
    if args.dry_run:
        render = getattr(provider, "render_program", None)
        if render is None:
            print(f"# provider '{provider.name}' runs programs as local processes:\n"
                  f"{sys.executable} {program.entrypoint}  (in a copy of {working_dir})")
        else:
            print(render(program, arguments))
        return 0
    job = s.run_program(program, arguments)
    print(job.job_id)
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    job = _serverless(args).get_job_by_id(args.job_id)
    info = job.info()
    if args.json:
        print(json.dumps(info, default=str))
    else:
        from hpc_serverless.programs import why_it_ended

        why = why_it_ended(info)
        print(f"{info['status']}" + (f" ({why})" if why else ""))
    return 0


def cmd_logs(args: argparse.Namespace) -> int:
    job = _serverless(args).get_job_by_id(args.job_id)
    if not args.follow:
        sys.stdout.write(job.logs())
        return 0
    shown = 0
    delay = 0.5
    while True:
        try:  # a dropped connection (transient) is waited out; the transport reconnects
            text = job.logs()
            if len(text) > shown:
                sys.stdout.write(text[shown:])
                sys.stdout.flush()
                shown = len(text)
            if job.status() in ("SUCCEEDED", "FAILED", "STOPPED"):
                sys.stdout.write(job.logs()[shown:])
                return 0
        except HPCServerlessError as exc:
            if not exc.transient:
                raise
            time.sleep(delay)
            delay = min(delay * 2, 10)
            continue
        delay = 0.5
        time.sleep(args.interval)


def cmd_result(args: argparse.Namespace) -> int:
    job = _serverless(args).get_job_by_id(args.job_id)
    try:
        value = job.result(timeout=args.timeout)
    except JobFailedError as exc:
        print(f"error: {str(exc).splitlines()[0]}", file=sys.stderr)
        return 3
    try:
        print(json.dumps(value, indent=1, default=repr))
    except (TypeError, ValueError):
        print(repr(value))
    return 0


def cmd_stop(args: argparse.Namespace) -> int:
    job = _serverless(args).get_job_by_id(args.job_id)
    print("stopped" if job.stop() else f"not running ({job.status()})")
    return 0


def cmd_jobs(args: argparse.Namespace) -> int:
    for job in _serverless(args).jobs()[: args.limit]:
        info = job.info()
        print(f"{job.job_id}  {info['status']:<9}  {info.get('title', '')}")
    return 0


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)


def cmd_gc(args: argparse.Namespace) -> int:
    from hpc_serverless.core.sessions import parse_duration

    try:
        seconds = parse_duration(args.older_than)
    except ValueError as exc:
        raise HPCServerlessError(str(exc)) from None
    report = _serverless(args).gc(seconds, dry_run=args.dry_run, programs=args.programs)
    if args.json:
        print(json.dumps(report, default=str))
        return 0
    verb = "would remove" if report["dry_run"] else "removed"
    for r in report["removed"]:
        print(f"{verb}  {r['id']}  {_size(r['bytes'])} in {r['files']} files")
    for k in report["kept"]:
        print(f"kept     {k['id']}  ({k['why']})")
    print(f"{verb} {len(report['removed'])} ({_size(report['bytes'])}, {report['files']} files) "
          f"on {report['site']}; kept {len(report['kept'])}")
    return 0


def cmd_du(args: argparse.Namespace) -> int:
    report = _serverless(args).du()
    if args.json:
        print(json.dumps(report, default=str))
        return 0
    print(f"{report['site']}: {report['storage']}")
    for s in report["sessions"]:
        kinds = ", ".join(f"{k} {s['files_by_kind'][k]} files/{_size(b)}" for k, b in s["bytes_by_kind"].items())
        print(f"  session {s['id']}  {_size(s['bytes'])} in {s['files']} files"
              f"{'  (live)' if s['live'] else ''}  [{kinds}]")
    for kind, v in report["kinds"].items():
        print(f"  {kind:<24} {_size(v['bytes']):>10}  {v['files']:>8} files")
    print(f"  {'total':<24} {_size(report['bytes']):>10}  {report['files']:>8} files")
    for e in report.get("environments", []):
        used = time.strftime("%Y-%m-%d %H:%M", time.localtime(e["last_used"])) if e["last_used"] else "?"
        print(f"  environment {e['key']}  {_size(e['bytes'])} in {e['files']} files, last used {used}: "
              + (", ".join(e["requirements"]) or "(no record)"))
    quota = report["quota"]
    print("quota: " + (quota if isinstance(quota, str) else "; ".join(quota)))
    return 0


def cmd_rm(args: argparse.Namespace) -> int:
    r = _serverless(args).remove_job(args.job_id)
    print(f"removed {r['id']} ({_size(r['bytes'])} in {r['files']} files)")
    return 0


def cmd_sites_check(args: argparse.Namespace) -> int:
    from hpc_serverless.providers.checks import check_site

    for line in check_site(args.site, connect=not args.offline):
        print(line)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hpc-serverless", description="Run and follow hpc_serverless programs; "
                                "look after a site's storage (gc, du, rm).")
    p.add_argument("--config", help="QuantumServerless configuration (YAML/JSON); default "
                   "$HPC_SERVERLESS_CONFIG or ./serverless.yaml")
    p.add_argument("--provider", help="provider name from the configuration (default: its default)")
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="submit a program; prints its job id")
    r.add_argument("entrypoint", help="the script to run (inside --working-dir if given)")
    r.add_argument("--working-dir", help="directory staged with the program (default: the entrypoint's)")
    r.add_argument("--title")
    r.add_argument("--arg", action="append", metavar="KEY=VALUE", help="an argument (JSON value or string)")
    r.add_argument("--arguments", metavar="JSON", help="all arguments as a JSON object")
    r.add_argument("--target", metavar="JSON", help='resources, e.g. \'{"cpu": 4, "time": 30}\'')
    r.add_argument("--dry-run", action="store_true", help="print the batch script instead of submitting")
    r.set_defaults(func=cmd_run)

    for name, func, helptext in [("status", cmd_status, "a job's status and reason"),
                                 ("logs", cmd_logs, "what a job printed"),
                                 ("result", cmd_result, "what a job passed to save_result"),
                                 ("stop", cmd_stop, "stop a job")]:
        c = sub.add_parser(name, help=helptext)
        c.add_argument("job_id")
        c.set_defaults(func=func)
        if name == "status":
            c.add_argument("--json", action="store_true", help="all fields as JSON")
        if name == "logs":
            c.add_argument("--follow", "-f", action="store_true", help="keep printing until the job ends")
            c.add_argument("--interval", type=float, default=2.0, help="seconds between reads with --follow")
        if name == "result":
            c.add_argument("--timeout", type=float, default=None, help="seconds to wait")

    j = sub.add_parser("jobs", help="the jobs you ran on the provider, newest first")
    j.add_argument("--limit", type=int, default=50)
    j.set_defaults(func=cmd_jobs)

    g = sub.add_parser("gc", help="remove finished sessions (and with --programs, programs) from a site")
    g.add_argument("--older-than", default="7d", metavar="DURATION",
                   help="only sessions not used for this long: 7d (default), 12h, 30m, 0")
    g.add_argument("--dry-run", action="store_true", help="list what would go and its size; remove nothing")
    g.add_argument("--programs", action="store_true", help="also finished programs older than the cutoff")
    g.add_argument("--json", action="store_true", help="the report as JSON")
    g.set_defaults(func=cmd_gc)
    d = sub.add_parser("du", help="bytes and files on a site, per session and per kind, and the quota")
    d.add_argument("--json", action="store_true", help="the report as JSON")
    d.set_defaults(func=cmd_du)
    rm = sub.add_parser("rm", help="remove a finished program's job directory")
    rm.add_argument("job_id")
    rm.set_defaults(func=cmd_rm)
    for c in (g, d, rm):  # also after the command: `hpc-serverless gc --provider cluster`
        c.add_argument("--provider", default=argparse.SUPPRESS, help="the provider (a Slurm or PBS site)")

    sites = sub.add_parser("sites", help="site configurations")
    ssub = sites.add_subparsers(dest="sites_command", required=True)
    chk = ssub.add_parser("check", help="validate a site config and try its scheduler commands")
    chk.add_argument("site", help="a site YAML file")
    chk.add_argument("--offline", action="store_true", help="only validate the file")
    chk.set_defaults(func=cmd_sites_check)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except HPCServerlessError as exc:
        print(f"error: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())

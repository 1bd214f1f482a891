"""Submit jobs/ray-job.yaml to a Ray cluster's job server and print how to follow it.

Example: python jobs/ray_submit.py --address http://HEAD:8265 --entrypoint "python -m batchcls.cli run ..."
Needs `pip install 'ray[default]'` where it runs (the job client); the cluster needs Ray 2.9 or newer.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
SPEC = Path(__file__).resolve().parent / "ray-job.yaml"
MISSING = "jobs/ray_submit.py needs Ray's job client ({} is missing): pip install 'batchcls[ray]'"


def load_spec(path: Path = SPEC) -> dict[str, Any]:
    """The spec as submit_job keyword arguments; a relative working_dir is taken from the repository root."""
    try:
        import yaml
    except ImportError:
        raise SystemExit(MISSING.format("pyyaml")) from None

    spec = yaml.safe_load(path.read_text())
    missing = {"entrypoint", "runtime_env"} - set(spec)
    if missing:
        raise SystemExit(f"{path} lacks {', '.join(sorted(missing))}: see the comments in jobs/ray-job.yaml")
    env = dict(spec["runtime_env"])
    if "working_dir" in env and "://" not in env["working_dir"]:
        env["working_dir"] = str((REPO / env["working_dir"]).resolve())
    return {**spec, "runtime_env": env}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--address", default=os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS"),
                    help="job server, e.g. http://HEAD:8265 (default: $RAY_API_SERVER_ADDRESS, $RAY_ADDRESS)")
    ap.add_argument("--spec", type=Path, default=SPEC, help="job spec YAML")
    ap.add_argument("--entrypoint", default=None, help="replace the spec's command (same runtime env)")
    args = ap.parse_args()
    if not args.address:
        raise SystemExit("give the job server: --address http://HEAD:8265 (or set RAY_ADDRESS)")
    try:
        from ray.job_submission import JobSubmissionClient
    except ImportError as e:  # no ray, or ray without [default] (its job client needs aiohttp, requests, ...)
        raise SystemExit(MISSING.format(e.name)) from None

    spec = load_spec(args.spec)
    if args.entrypoint:
        spec["entrypoint"] = args.entrypoint
    job_id = JobSubmissionClient(args.address).submit_job(**spec)
    print(f"submitted {job_id}: follow it with  ray job logs --follow --address {args.address} {job_id}")


if __name__ == "__main__":
    main()

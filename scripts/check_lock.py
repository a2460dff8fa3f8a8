"""Compare the installed packages with requirements/lock.txt and print what differs.

    python scripts/check_lock.py            # exit 1 if a locked package is missing or at another version
    python scripts/check_lock.py --report   # print the differences only (for the --latest environment)
"""

from __future__ import annotations

import argparse
import re
import sys
from importlib import metadata
from pathlib import Path

from packaging.utils import canonicalize_name as canonical

LOCK = Path(__file__).resolve().parents[1] / "requirements" / "lock.txt"
PIN = re.compile(r"^([A-Za-z0-9_.\-]+)==(\S+)")


def locked() -> dict[str, str]:
    pins = (PIN.match(line) for line in LOCK.read_text().splitlines())
    return {canonical(m[1]): m[2] for m in pins if m}


def installed() -> dict[str, str]:
    return {canonical(d.metadata["Name"]): d.version for d in metadata.distributions()}


def differences(lock: dict[str, str], have: dict[str, str]) -> list[str]:
    lines = []
    for name in sorted(lock):
        if have.get(name) != lock[name]:
            lines.append(f"  {name}: locked {lock[name]}, installed {have.get(name, 'nothing')}")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--report", action="store_true", help="print the differences; never fail")
    args = parser.parse_args()
    diff = differences(locked(), installed())
    if not diff:
        print(f"[lock] every package matches {LOCK.name} ({len(locked())} pins)")
        return 0
    print(f"[lock] {len(diff)} package(s) differ from {LOCK.name}:")
    print("\n".join(diff))
    return 0 if args.report else 1


if __name__ == "__main__":
    sys.exit(main())

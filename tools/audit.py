"""`make audit`: the installed packages against PyPI's vulnerability data, from pip-audit's JSON report.

Says plainly when no data could be had (a machine whose registry mirror does not serve PyPI's per-release
JSON): pip-audit then skips every package and would otherwise print "No known vulnerabilities found".
Exit code 0: none known; 1: some; 2: nothing could be checked.
"""

import json
import sys


def main(path: str) -> int:
    deps = json.load(open(path))["dependencies"]
    audited = [d for d in deps if "skip_reason" not in d]
    vulns = [(d, v) for d in audited for v in d["vulns"]]
    for d, v in vulns:
        fixed = ", ".join(v["fix_versions"]) or "no fix yet"
        print(f"{d['name']} {d['version']}: {v['id']} (fixed in {fixed})")
    print(f"make audit: {len(audited)} of {len(deps)} installed packages checked, {len(vulns)} known vulnerabilities.")
    if not audited:
        print("No vulnerability data reached this machine (PyPI answered for none of them): nothing was checked.")
        return 2
    return 1 if vulns else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
